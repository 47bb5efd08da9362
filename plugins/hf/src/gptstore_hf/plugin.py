"""Hook implementations of gptstore-hf. Heavy imports happen inside the sources' methods."""

from __future__ import annotations

from collections.abc import Iterator

from gptstore.plugin import (
    ModelSource,
    hookimpl,
)
from gptstore_hf.gguf_source import GgufOptions, GgufSource
from gptstore_hf.hub import HubOptions, HubSource


@hookimpl
def gptstore_model_sources() -> Iterator[ModelSource]:
    yield ModelSource(
        name="hf",
        factory=HubSource,
        options_type=HubOptions,
        description="The Hugging Face hub (its local cache when offline)",
    )
    yield ModelSource(
        name="gguf",
        factory=GgufSource,
        options_type=GgufOptions,
        description="GGUF files (paths, or installed packages that carry them), imported as "
        "float32 safetensors",
    )
