"""Hook implementations only: this is the module the entry point names.

Keep imports here cheap. Anything heavy (torch, transformers) belongs inside a factory, so that
``gptstore --help`` stays fast and a missing dependency breaks only this plugin.
"""

from __future__ import annotations

from collections.abc import Iterator

from attrs import field, frozen

from gptstore.plugin import (
    Criterion,
    ModelCard,
    Requirement,
    Score,
    ScoringPolicy,
    hookimpl,
    str_tuple,
)

PERMISSIVE = ("apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc-by-4.0")


@frozen
class PermissiveFirstOptions:
    """``[policies.permissive-first]`` in config.toml."""

    licenses: tuple[str, ...] = field(default=PERMISSIVE, converter=str_tuple)


class PermissiveFirst:
    """Permissive licenses first; among those, higher reported quality first."""

    def __init__(self, options: PermissiveFirstOptions) -> None:
        self.licenses = {name.lower() for name in options.licenses}

    def score(self, card: ModelCard, requirement: Requirement) -> Score:
        permissive = 1.0 if card.license in self.licenses else 0.0
        quality = card.quality or 0.0
        return Score(
            total=(2.0 * permissive + quality) / 3.0,
            breakdown=(
                Criterion(
                    "license",
                    permissive,
                    2.0,
                    f"{card.license or 'unknown'} is "
                    + ("permissive" if permissive else "not on the permissive list"),
                ),
                Criterion(
                    "quality",
                    quality,
                    1.0,
                    "mean of reported metrics"
                    if card.quality is not None
                    else "no reported metrics",
                ),
            ),
        )


@hookimpl
def gptstore_scoring_policies() -> Iterator[ScoringPolicy]:
    yield ScoringPolicy(
        name="permissive-first",
        factory=PermissiveFirst,
        options_type=PermissiveFirstOptions,
        description="Permissive licenses first, then reported quality (template plugin)",
    )
