"""Grouped-query attention for the ONNX export, without repeating keys and values.

transformers computes grouped-query attention (fewer key/value heads than query heads, as in
Llama, Mistral, Qwen2 and SmolLM2) by repeating each key/value head for its query heads before the
products. Traced into ONNX, that copy runs at every decode step, on the whole cache: for SmolLM2
at 256 tokens, 35 MB written and read again per token. Here the query heads of a group are
folded into the sequence axis instead, so each product reads the cache as it is: the same
arithmetic, without the copy.

Applied only while exporting (:func:`grouped_attention`), to transformers' ``sdpa`` attention; the
export is then checked against the unchanged torch model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: Keyword arguments of attention functions that change the result and that the grouped form
#: does not implement; a call with any of them set goes to transformers' own function.
UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "sinks")


def grouped_sdpa(original: Callable[..., Any]) -> Callable[..., Any]:
    """An ``sdpa`` attention function that handles grouped-query attention itself and hands
    everything else to ``original``."""

    def attention(
        module: Any,
        query: Any,
        key: Any,
        value: Any,
        attention_mask: Any,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[Any, None]:
        import torch

        batch, heads, length, size = query.shape
        kv_heads, total = key.shape[1], key.shape[2]
        if (
            kv_heads == heads
            or heads % kv_heads
            or dropout
            or any(kwargs.get(name) is not None for name in UNSUPPORTED)
            or (attention_mask is None and length > 1)  # causal without a mask: transformers'
            or (attention_mask is not None and attention_mask.shape[1] != 1)  # a mask per head
        ):
            return original(  # type: ignore[no-any-return]
                module,
                query,
                key,
                value,
                attention_mask,
                dropout=dropout,
                scaling=scaling,
                is_causal=is_causal,
                **kwargs,
            )
        group = heads // kv_heads
        scale = size**-0.5 if scaling is None else scaling
        # [batch, kv_heads, group * length, size]: query heads h = k * group + g share kv head k.
        folded = query.reshape(batch, kv_heads, group * length, size)
        scores = torch.matmul(folded, key.transpose(2, 3)) * scale
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:  # True: attend
                attention_mask = torch.zeros(
                    attention_mask.shape, dtype=query.dtype, device=query.device
                ).masked_fill(~attention_mask, torch.finfo(query.dtype).min)
            scores = scores.view(batch, kv_heads, group, length, total)
            scores = scores + attention_mask[:, :, None, :, :total]
            scores = scores.view(batch, kv_heads, group * length, total)
        probs = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(probs, value).view(batch, heads, length, size)
        return out.transpose(1, 2).contiguous(), None

    return attention


_installed = threading.Lock()  # one export at a time swaps the mapping


@contextmanager
def grouped_attention() -> Iterator[None]:
    """While the block runs, transformers' ``sdpa`` attention is :func:`grouped_sdpa`.

    The mapping is process-wide: a torch model run meanwhile in another thread gets the grouped
    form too, which computes the same attention. Exports in several threads take turns.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    with _installed:
        had_local = "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
        previous = ALL_ATTENTION_FUNCTIONS["sdpa"]
        ALL_ATTENTION_FUNCTIONS["sdpa"] = grouped_sdpa(previous)
        try:
            yield
        finally:
            if had_local:
                ALL_ATTENTION_FUNCTIONS["sdpa"] = previous
            else:
                del ALL_ATTENTION_FUNCTIONS["sdpa"]
