"""Constrained decoding with llguidance: a request's grammar as a mask over the logits.

llguidance was measured against xgrammar and outlines-core on SmolLM2's tokenizer
(``bench/grammar_bench.py``, docs/benchmarks.md). It compiles a schema in about a millisecond
(xgrammar 4-24 ms, outlines-core 40-600 ms), computes a mask and advances in 20-30 µs (xgrammar
about 10 µs, outlines-core 75-240 µs: all under 1% of a decode step of several milliseconds),
takes OpenAI's ``json_object`` (any JSON: recursive, which outlines-core's regular expressions
cannot express) and Lark grammars that embed JSON schemas (tool calls), and needs nothing but
numpy, where xgrammar needs torch and triton. Each row of a batch has its own matcher, so rows
with different grammars (or none) decode together.

JSON is written compactly with ``", "`` and ``": "`` separators, as ``json.dumps`` writes it:
flexible whitespace lets a small model pad an answer with newlines until max_tokens runs out.
"""

from __future__ import annotations

import copy
import importlib
import json
import threading
from typing import Any

from gptstore.errors import GptstoreError, InvalidInput
from gptstore.types import Constraint

#: llguidance's JSON options: compact, in the separators models see most.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance() -> Any:
    try:
        return importlib.import_module("llguidance")
    except ImportError:
        raise GptstoreError(
            "structured outputs need llguidance in the server's environment: pip install llguidance"
        ) from None


def grammar_of(constraint: Constraint) -> str:
    """llguidance's grammar for a constraint (not yet checked against a tokenizer)."""
    ll = _llguidance()
    if constraint.kind == "json_schema":
        try:
            schema = json.loads(constraint.source)
        except ValueError as exc:
            raise InvalidInput("response_format", [f"the schema is not JSON: {exc}"]) from None
        return str(ll.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS))
    if constraint.kind == "lark":
        return str(ll.LLMatcher.grammar_from_lark(constraint.source))
    return str(ll.LLMatcher.grammar_from_regex(constraint.source))


class Grammars:
    """Matchers for one tokenizer: the tokenizer's llguidance form is built once (about a second
    for a 49k vocabulary), on the first constrained request."""

    def __init__(self, tokenizer: Any, eos_ids: set[int]) -> None:
        self._hf = tokenizer
        self._eos = sorted(eos_ids)
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._build()
            return self._tokenizer

    def _build(self) -> Any:
        ll = _llguidance()
        backend = getattr(self._hf, "backend_tokenizer", None)
        if backend is None:
            raise GptstoreError(
                "structured outputs need a fast (Rust) tokenizer; this model's is a slow one"
            )
        backend = copy.copy(backend)
        backend.no_padding()
        backend.no_truncation()
        spec = json.loads(backend.to_str())
        # Tokenizers converted from GGUF (SmolLM2's among them) wrap the byte-level decoder in a
        # sequence with byte-fallback steps that never apply to a byte-level vocabulary;
        # llguidance reads the token bytes right only from a plain ByteLevel decoder.
        decoder = spec.get("decoder") or {}
        if decoder.get("type") == "Sequence":
            byte_level = [d for d in decoder.get("decoders", []) if d.get("type") == "ByteLevel"]
            if byte_level:
                spec["decoder"] = byte_level[0]
        vocab = len(self._hf)
        return ll.LLTokenizer(json.dumps(spec), n_vocab=vocab, eos_token=self._eos or None)

    def matcher(self, constraint: Constraint) -> Any:
        """A fresh matcher, or InvalidInput naming what is wrong with the grammar."""
        ll = _llguidance()
        grammar = grammar_of(constraint)
        error = ll.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error and not error.startswith("WARNING"):
            raise InvalidInput(where(constraint), [f"the grammar is not usable: {error}"])
        matcher = ll.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidInput(where(constraint), [matcher.get_error()])
        return matcher


def where(constraint: Constraint) -> str:
    return "response_format" if constraint.kind == "json_schema" else "grammar"


def allowed(matcher: Any, vocab: int) -> Any:
    """A boolean numpy array over the vocabulary: the tokens the matcher accepts next."""
    import numpy as np

    words: Any = np.empty((vocab + 31) // 32, dtype=np.int32)
    matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    return bits[:vocab].astype(bool)
