"""Hook implementations of gptstore-torch. torch is imported when a model is loaded, not here."""

from __future__ import annotations

from collections.abc import Iterator

from gptstore.plugin import ServingBackend, hookimpl
from gptstore_torch.runner import TorchBackend, TorchOptions


@hookimpl
def gptstore_serving_backends() -> Iterator[ServingBackend]:
    yield ServingBackend(
        name="torch",
        factory=TorchBackend,
        options_type=TorchOptions,
        description="PyTorch eager via transformers (CPU, or CUDA when present)",
    )
