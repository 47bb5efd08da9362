"""gptstore sync over several sources: a broken source fails alone."""

from __future__ import annotations

from gptstore import hookimpl
from gptstore.catalog import Catalog
from gptstore.config import Config
from gptstore.protocols import Refusal
from gptstore.records import ModelSource
from gptstore.sync import sync_catalog
from gptstore.types import ModelCard, SourceStatus


class Listing:
    def __init__(self, name, items, online=True):
        self.name, self.items, self.online = name, items, online

    def search(self, query):
        yield from self.items

    def fetch(self, model_id, revision, dest):
        raise NotImplementedError

    def status(self):
        return SourceStatus(self.online, "in memory" if self.online else "offline: cache only")


class Sources:
    @hookimpl
    def gptstore_model_sources(self):
        good = [ModelCard(source="good", model_id="a"), Refusal("b", "pickle weights only")]
        wrong = [ModelCard(source="wrong", model_id="x"), ModelCard(source="other", model_id="y")]
        yield ModelSource(name="good", factory=lambda _o: Listing("good", good))
        yield ModelSource(name="wrong", factory=lambda _o: Listing("wrong", wrong))
        yield ModelSource(name="crashing", factory=lambda _o: 1 / 0)


def test_a_broken_source_fails_alone(plugin_manager, tmp_path):
    plugin_manager.register_plugin(Sources(), "test-sources")
    catalog = Catalog(tmp_path / "catalog.db")
    catalog.upsert([ModelCard(source="wrong", model_id="kept")], source="wrong")
    results = {
        r.source: r
        for r in sync_catalog(
            catalog, plugin_manager, Config(), ("good", "wrong", "crashing", "LOCAL")
        )
    }
    assert (results["good"].added, results["good"].refused) == (1, (("b", "pickle weights only"),))
    assert "must yield ModelCard records with source='wrong'" in results["wrong"].error
    assert results["crashing"].error == "ZeroDivisionError: division by zero"
    assert results["local"].error is None
    assert catalog.resolve("good:a").listed
    assert catalog.resolve("wrong:kept").listed  # a failed source keeps its cards
    runs = catalog.execute("SELECT source, error IS NOT NULL FROM sync_runs ORDER BY source")
    assert runs == [("crashing", 1), ("good", 0), ("local", 0), ("wrong", 0), ("wrong", 1)]


class Flaky:
    online = True

    @hookimpl
    def gptstore_model_sources(self):
        cards = [ModelCard(source="flaky", model_id="cached")]
        if Flaky.online:
            cards.append(ModelCard(source="flaky", model_id="remote-only"))
        yield ModelSource(name="flaky", factory=lambda _o: Listing("flaky", cards, Flaky.online))


def test_an_offline_source_delists_nothing(plugin_manager, tmp_path):
    plugin_manager.register_plugin(Flaky(), "flaky")
    catalog = Catalog(tmp_path / "catalog.db")
    Flaky.online = True
    [first] = sync_catalog(catalog, plugin_manager, Config(), ("flaky",))
    assert (first.added, first.offline) == (2, None)
    Flaky.online = False
    [second] = sync_catalog(catalog, plugin_manager, Config(), ("flaky",))
    assert (second.unchanged, second.delisted, second.offline) == (1, 0, "offline: cache only")
    assert catalog.resolve("flaky:remote-only").listed
