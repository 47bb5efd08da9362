"""Hugging Face hub answers (``ModelInfo``) as gptstore model cards."""

from __future__ import annotations

from collections import Counter
from typing import Any

from gptstore.plugin import (
    SAFETENSORS_DTYPES,
    ModelCard,
    as_tuple,
    parse_model_index,
)

SOURCE = "hf"

# Tags that restate structured fields (or are noise for search): kept out of card.tags.
_TAG_PREFIXES = (
    "license:",
    "region:",
    "base_model:",
    "dataset:",
    "arxiv:",
    "doi:",
    "endpoints_compatible",
    "autotrain_compatible",
    "text-generation-inference",
)


def model_info_to_card(
    info: Any, endpoint: str = "https://huggingface.co", context_length: int | None = None
) -> ModelCard:
    """A card from a ``huggingface_hub.ModelInfo`` listed with the expand fields in
    :data:`gptstore_hf.hub.EXPAND`."""
    card_data = info.card_data
    data = card_data.to_dict() if card_data is not None else {}
    safetensors = info.safetensors
    parameters = safetensors.total if safetensors is not None else None
    dtype = None
    if safetensors is not None and safetensors.parameters:
        top = Counter(safetensors.parameters).most_common(1)[0][0]
        dtype = SAFETENSORS_DTYPES.get(top, top.lower())
    config = info.config or {}
    architectures = config.get("architectures") or []
    tags = tuple(t for t in info.tags or () if not t.startswith(_TAG_PREFIXES))
    license_value = next(iter(as_tuple(data.get("license"))), None) or next(
        (t.split(":", 1)[1] for t in info.tags or () if t.startswith("license:")), None
    )
    if license_value == "other" and data.get("license_name"):
        license_value = str(data["license_name"])
    return ModelCard(
        source=SOURCE,
        model_id=info.id,
        revision=info.sha,
        name=info.id,
        description=str(data.get("model_name") or ""),
        architecture=architectures[0] if architectures else None,
        parameters=parameters,
        dtype=dtype,
        # The listing carries no config values beyond the architecture; the caller passes the
        # context length when the revision's config.json is in the HF cache.
        context_length=context_length,
        tasks=as_tuple(info.pipeline_tag),
        languages=as_tuple(data.get("language")),
        license=license_value,
        tags=tags,
        base_model=next(iter(as_tuple(data.get("base_model"))), None),
        # to_dict() writes the parsed eval results back as a model-index block.
        metrics=parse_model_index(data.get("model-index")),
        popularity=info.downloads or 0,
        likes=info.likes or 0,
        created_at=info.created_at,
        updated_at=info.last_modified,
        location=f"{endpoint.rstrip('/')}/{info.id}",
    )
