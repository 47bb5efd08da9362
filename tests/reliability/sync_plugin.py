"""A gptstore plugin for the kill -9 test of `gptstore sync` (test_sync_kill.py installs it as a
fake distribution, so the `gptstore` command loads it through its entry point as it loads any
installed plugin).

It provides the model source ``synthetic``: thousands of synthetic cards
(:func:`gptstore.testing.synthetic.synthetic_cards`), a window over one endless stream that
``[sources.synthetic] generation`` moves, so that each generation adds, updates, keeps and delists
cards.

With ``$GPTSTORE_RELIABILITY_PAUSE`` set it also injects a pause into the sync's one write
transaction, so that the test can kill the process at a known point of the write:

- ``card:N``: after the sync has written N cards (of any source) into the open transaction;
- ``commit``: after everything is written, just before COMMIT.

At the pause the process creates the file ``$GPTSTORE_RELIABILITY_MARKER`` and sleeps until it is
killed. The write transaction runs with a small page cache (``$GPTSTORE_RELIABILITY_CACHE_PAGES``
pages), so that SQLite spills uncommitted pages into the catalog's WAL long before COMMIT, as a
sync of many more cards does with the default cache: the kill leaves uncommitted frames behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from attrs import evolve, frozen

from gptstore import hookimpl
from gptstore.catalog import Catalog
from gptstore.records import ModelSource
from gptstore.testing.synthetic import synthetic_cards
from gptstore.types import ModelCard, SearchQuery, SourceStatus

PAUSE = "GPTSTORE_RELIABILITY_PAUSE"
MARKER = "GPTSTORE_RELIABILITY_MARKER"
CACHE_PAGES = "GPTSTORE_RELIABILITY_CACHE_PAGES"
#: Cards the window moves per generation: that many are delisted and as many added.
SHIFT = 250


@frozen
class SyntheticOptions:
    """``[sources.synthetic]``: how many cards, and which generation of the listing."""

    count: int = 4000
    generation: int = 0


def listing(options: SyntheticOptions) -> list[ModelCard]:
    """Generation g: cards [g * SHIFT, g * SHIFT + count) of the stream, every seventh (shifted
    by g) with a description that names the generation, so it is updated."""
    start = options.generation * SHIFT
    cards = list(synthetic_cards(start + options.count, seed=7))[start:]
    return [
        evolve(card, description=f"{card.description} Generation {options.generation}.")
        if index % 7 == options.generation % 7
        else card
        for index, card in enumerate(cards, start)
    ]


class SyntheticSource:
    def __init__(self, options: SyntheticOptions) -> None:
        self.options = options

    def search(self, query: SearchQuery) -> Iterator[ModelCard]:
        yield from listing(self.options)

    def fetch(self, model_id: str, revision: str | None, dest: Any) -> Any:
        raise NotImplementedError("synthetic cards have no files")

    def status(self) -> SourceStatus:
        return SourceStatus(True, f"generation {self.options.generation}")


@hookimpl
def gptstore_model_sources() -> Iterator[ModelSource]:
    yield ModelSource(
        name="synthetic",
        factory=lambda options: SyntheticSource(options or SyntheticOptions()),
        options_type=SyntheticOptions,
        description="Synthetic cards for the reliability tests",
    )


# -- the pause -------------------------------------------------------------------------------


def _pause() -> None:
    with open(os.environ[MARKER], "w") as marker:
        marker.write(str(os.getpid()))
    time.sleep(600)  # the test kills the process here
    raise SystemExit("the reliability test did not kill this sync")


def _install_pause(point: str) -> None:
    kind, _sep, count = point.partition(":")
    written = 0
    wrote = False
    original_write = Catalog.write
    original_replace = Catalog.replace_source

    def counted(cards: Iterable[ModelCard]) -> Iterator[ModelCard]:
        nonlocal written
        for card in cards:
            if kind == "card" and written == int(count):
                _pause()
            written += 1
            yield card
        if kind == "card" and written == int(count):
            _pause()

    def replace_source(
        self: Catalog, conn: Any, source: str, cards: Iterable[ModelCard], **kwargs: Any
    ) -> Any:
        nonlocal wrote
        wrote = True
        return original_replace(self, conn, source, counted(cards), **kwargs)

    @contextmanager
    def write(self: Catalog) -> Iterator[Any]:
        with original_write(self) as conn:
            conn.execute(f"PRAGMA cache_size = {int(os.environ.get(CACHE_PAGES, '64'))}")
            yield conn
            if kind == "commit" and wrote:
                _pause()

    Catalog.write = write  # type: ignore[method-assign]
    Catalog.replace_source = replace_source  # type: ignore[method-assign]


if os.environ.get(PAUSE):
    _install_pause(os.environ[PAUSE])
