"""The plugin manager against fake installed distributions (real dist-info folders)."""

from __future__ import annotations

import sys
import warnings

import pytest

from gptstore.errors import PluginError, UnknownName
from gptstore.manager import PluginLoadWarning, build, make_plugin_manager
from gptstore.records import ModelSource, ScoringPolicy
from gptstore.testing import run_cli

GOOD = """
from gptstore import hookimpl
from gptstore.records import ScoringPolicy
from gptstore.types import Score

class Flat:
    def __init__(self, options):
        pass
    def score(self, card, requirement):
        return Score(0.5)

@hookimpl
def gptstore_scoring_policies():
    yield ScoringPolicy(name="flat", factory=Flat, description="everything scores 0.5")
"""

BROKEN_IMPORT = """
import gptstore_dependency_that_is_not_installed
"""

TYPO_HOOK = """
from gptstore import hookimpl

@hookimpl
def gptstore_scoring_policy():
    return []
"""

WRONG_ARGS = """
from gptstore import hookimpl

@hookimpl
def gptstore_model_sources(config):
    return []
"""

WRONG_RECORDS = """
from gptstore import hookimpl

@hookimpl
def gptstore_scoring_policies():
    return ["not a record"]
"""

DUPLICATE = GOOD.replace("everything scores 0.5", "another flat")

# The error is raised in json's code; the place to show is the plugin's line that called it.
DEEP_ERROR = """
import json


def _read():
    return json.loads("{not json")


SETTINGS = _read()
"""

FAILING_HOOK = """
from gptstore import hookimpl


def _policies():
    raise RuntimeError("no policies today")


@hookimpl
def gptstore_scoring_policies():
    return _policies()
"""

BAD_SYNTAX = """
def broken(:
    pass
"""

LONG_NAME = "gptstore_needs_a_dependency_with_an_extremely_long_module_name_not_installed_here"


def infos(manager):
    return {info.name: info for info in manager.plugin_infos()}


def test_builtins_are_ordinary_plugins(plugin_manager):
    names = {i.name: i for i in plugin_manager.plugin_infos()}
    assert names["gptstore.local"].builtin
    assert names["gptstore.local"].status == "loaded"
    assert set(plugin_manager.registrations(ScoringPolicy)) == {
        "balanced",
        "smallest",
        "best-quality",
    }
    assert set(plugin_manager.registrations(ModelSource)) == {"local", "store"}


def test_entry_point_plugin_is_loaded_with_its_distribution(fake_dist):
    fake_dist("gptstore-flat", {"flat": "flat_plugin"}, {"flat_plugin": GOOD}, version="2.5")
    manager = make_plugin_manager()
    info = infos(manager)["flat"]
    assert (info.status, info.distribution, info.version) == ("loaded", "gptstore-flat", "2.5")
    assert info.hooks == ("gptstore_scoring_policies",)
    assert "flat" in manager.registrations(ScoringPolicy)


def test_failed_import_is_skipped_with_a_warning_and_recorded(fake_dist):
    fake_dist("gptstore-broken", {"broken": "broken_plugin"}, {"broken_plugin": BROKEN_IMPORT})
    fake_dist("gptstore-flat", {"flat": "flat_plugin"}, {"flat_plugin": GOOD})
    with pytest.warns(PluginLoadWarning, match=r"skipped plugin 'broken' \(gptstore-broken 1.0\)"):
        manager = make_plugin_manager()
    broken = infos(manager)["broken"]
    assert broken.status == "failed"
    assert "ModuleNotFoundError" in broken.error
    assert "gptstore_dependency_that_is_not_installed" in broken.error
    assert "flat" in manager.registrations(ScoringPolicy)  # the others still work


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (TYPO_HOOK, "gptstore_scoring_policy is not a gptstore hook"),
        (WRONG_ARGS, "bad hooks"),
    ],
)
def test_hooks_that_do_not_match_the_specs_are_refused(fake_dist, source, expected):
    fake_dist("gptstore-bad", {"bad": "bad_plugin"}, {"bad_plugin": source})
    with pytest.warns(PluginLoadWarning, match="bad"):
        manager = make_plugin_manager()
    info = infos(manager)["bad"]
    assert info.status == "failed"
    assert expected in info.error
    assert manager.get_plugin("bad") is None
    assert "local" in manager.registrations(ModelSource)


def test_hook_yielding_wrong_objects_is_reported(fake_dist):
    fake_dist("gptstore-wrong", {"wrong": "wrong_plugin"}, {"wrong_plugin": WRONG_RECORDS})
    manager = make_plugin_manager()
    with pytest.warns(PluginLoadWarning, match="must yield ScoringPolicy records"):
        policies = manager.registrations(ScoringPolicy)
    assert "balanced" in policies
    assert infos(manager)["wrong"].status == "failed"


def test_the_warning_names_the_package_once_and_says_how_to_silence_it(fake_dist, monkeypatch):
    site = fake_dist(
        "gptstore-broken", {"broken": "broken_plugin"}, {"broken_plugin": BROKEN_IMPORT}
    )
    with pytest.warns(PluginLoadWarning) as caught:
        make_plugin_manager()
    [message] = [str(w.message) for w in caught]
    assert message == (
        "skipped plugin 'broken' (gptstore-broken 1.0): import failed: ModuleNotFoundError: "
        "No module named 'gptstore_dependency_that_is_not_installed' "
        f"(at {site / 'broken_plugin.py'}:2: import gptstore_dependency_that_is_not_installed); "
        "run with GPTSTORE_DISABLED_PLUGINS=broken to skip it quietly, or "
        "GPTSTORE_STRICT_PLUGINS=1 for the traceback"
    )
    monkeypatch.setenv("GPTSTORE_DISABLED_PLUGINS", "broken")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the advice works: no warning at all
        assert infos(make_plugin_manager())["broken"].status == "disabled"


@pytest.mark.parametrize(
    ("module", "source", "line"),
    [
        ("deep_plugin", DEEP_ERROR, '6: return json.loads("{not json")'),
        ("syntax_plugin", BAD_SYNTAX, "2: def broken(:"),
    ],
    ids=["raised-below-the-plugin", "syntax-error"],
)
def test_an_import_error_names_the_plugins_file_and_line(fake_dist, module, source, line):
    site = fake_dist("gptstore-x", {"x": module}, {module: source})
    place = f"(at {site / module}.py:{line})"
    with pytest.raises(PluginError) as excinfo:
        make_plugin_manager(strict=True)
    assert str(excinfo.value).startswith('Error loading plugin "x": import failed: ')
    assert str(excinfo.value).endswith(place)
    with pytest.warns(PluginLoadWarning, match="import failed"):
        manager = make_plugin_manager()
    assert infos(manager)["x"].error.endswith(place)  # the stored error says it too


def test_a_failing_hook_names_the_plugins_file_and_line(fake_dist):
    site = fake_dist("gptstore-fails", {"fails": "failing_hook"}, {"failing_hook": FAILING_HOOK})
    manager = make_plugin_manager()
    with pytest.warns(PluginLoadWarning, match="no policies today"):
        manager.registrations(ScoringPolicy)
    assert infos(manager)["fails"].error == (
        "gptstore_scoring_policies failed: RuntimeError: no policies today "
        f'(at {site / "failing_hook.py"}:6: raise RuntimeError("no policies today"))'
    )


def test_strict_mode_reraises(fake_dist, monkeypatch):
    fake_dist("gptstore-broken", {"broken": "broken_plugin"}, {"broken_plugin": BROKEN_IMPORT})
    monkeypatch.setenv("GPTSTORE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match='Error loading plugin "broken": import failed'):
        make_plugin_manager()


def test_disabled_plugins_are_blocked(fake_dist, monkeypatch):
    fake_dist("gptstore-flat", {"flat": "flat_plugin"}, {"flat_plugin": GOOD})
    monkeypatch.setenv("GPTSTORE_DISABLED_PLUGINS", "flat, gptstore.scoring")
    manager = make_plugin_manager()
    assert infos(manager)["flat"].status == "disabled"
    assert infos(manager)["gptstore.scoring"].status == "disabled"
    assert not {"flat", "balanced", "smallest"} & set(manager.registrations(ScoringPolicy))


def test_load_plugins_loads_only_those(fake_dist, monkeypatch):
    fake_dist("gptstore-flat", {"flat": "flat_plugin"}, {"flat_plugin": GOOD})
    fake_dist("gptstore-broken", {"broken": "broken_plugin"}, {"broken_plugin": BROKEN_IMPORT})
    monkeypatch.setenv("GPTSTORE_LOAD_PLUGINS", "flat")
    manager = make_plugin_manager()  # no warning: broken is never imported
    assert "broken_plugin" not in sys.modules
    assert infos(manager)["broken"].status == "disabled"
    assert infos(manager)["broken"].error == "not listed in GPTSTORE_LOAD_PLUGINS"
    assert infos(manager)["flat"].status == "loaded"
    assert infos(manager)["gptstore.local"].status == "loaded"


def test_duplicate_names_name_both_distributions(fake_dist):
    fake_dist("gptstore-flat", {"flat": "flat_plugin"}, {"flat_plugin": GOOD})
    fake_dist(
        "gptstore-flat-fork", {"flatfork": "flat_fork"}, {"flat_fork": DUPLICATE}, version="0.3"
    )
    manager = make_plugin_manager()
    with pytest.raises(PluginError) as excinfo:
        manager.registrations(ScoringPolicy)
    message = str(excinfo.value)
    assert "scoring policy 'flat' is registered twice" in message
    assert "gptstore-flat 1.0 (plugin flat)" in message
    assert "gptstore-flat-fork 0.3 (plugin flatfork)" in message


def test_unknown_name_lists_the_valid_ones(plugin_manager):
    with pytest.raises(UnknownName) as excinfo:
        plugin_manager.get(ScoringPolicy, "fastest")
    assert str(excinfo.value) == (
        "unknown scoring policy 'fastest'; valid names: balanced, best-quality, smallest"
    )


def test_options_are_structured_with_paths(plugin_manager):
    record = plugin_manager.get(ScoringPolicy, "balanced")
    with pytest.raises(Exception, match=r"expected float, got str @ \$.policies.balanced.weights"):
        build(record, {"weights": {"quality": "high"}}, where="$.policies.balanced")
    with pytest.raises(Exception, match=r"extra fields found \(speed\)"):
        build(record, {"speed": 1}, where="$.policies.balanced")


def test_cli_still_works_with_a_broken_plugin(fake_dist, tmp_path):
    site = fake_dist(
        "gptstore-broken", {"broken": "broken_plugin"}, {"broken_plugin": BROKEN_IMPORT}
    )
    env = {"PYTHONPATH": str(site), "GPTSTORE_HOME": str(tmp_path / "home")}
    result = run_cli("plugins", env=env)
    assert result.returncode == 0, result.stderr
    assert "broken" in result.stdout
    assert "failed" in result.stdout
    assert "gptstore_dependency_that_is_not_installed" in result.stdout
    assert "warning (plugin): skipped plugin 'broken'" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("select", "--task", "text-generation", env=env)
    assert result.returncode == 0, result.stderr


def test_the_plugins_table_shows_the_whole_error_on_a_narrow_terminal(fake_dist, tmp_path):
    site = fake_dist(
        "gptstore-long", {"long": "long_plugin"}, {"long_plugin": f"import {LONG_NAME}"}
    )
    env = {"PYTHONPATH": str(site), "GPTSTORE_HOME": str(tmp_path / "home"), "COLUMNS": "80"}
    result = run_cli("plugins", env=env)
    assert result.returncode == 0, result.stderr
    error = (
        f"import failed: ModuleNotFoundError: No module named '{LONG_NAME}' "
        f"(at {site / 'long_plugin.py'}:1: import {LONG_NAME})"
    )
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    # Folded over several lines, but every character is there, in order.
    assert "".join(error.split()) in "".join(result.stdout.split())


def test_a_plugin_name_collision_keeps_the_first_and_reports_the_second(fake_dist):
    fake_dist("gptstore-impostor", {"gptstore.scoring": "impostor"}, {"impostor": GOOD})
    with pytest.warns(
        PluginLoadWarning, match="'gptstore.scoring' is already taken by gptstore"
    ) as caught:
        manager = make_plugin_manager()
    assert str(caught[0].message).endswith("; uninstall gptstore-impostor to silence this")
    [builtin] = [
        i
        for i in manager.plugin_infos()
        if i.distribution == "gptstore" and i.name == "gptstore.scoring"
    ]
    assert (builtin.status, builtin.builtin) == ("loaded", True)
    [impostor] = [i for i in manager.plugin_infos() if i.distribution == "gptstore-impostor"]
    assert impostor.status == "failed"
    assert "flat" not in manager.registrations(ScoringPolicy)
    with pytest.raises(PluginError, match="already taken"):
        manager.register_plugin(object(), "gptstore.local")
