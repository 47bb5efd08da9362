"""The docs say what the code does: every hook and protocol method is documented with its exact
signature in docs/plugins/hooks.md, and the README's commands exist."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from gptstore import hookspecs, protocols

REPO = Path(__file__).resolve().parents[1]
HOOKS_MD = (REPO / "docs" / "plugins" / "hooks.md").read_text()
HOOKS = {
    name: func
    for name, func in inspect.getmembers(hookspecs, inspect.isfunction)
    if name.startswith("gptstore_")
}
PROTOCOLS = (
    protocols.Source,
    protocols.Scorer,
    protocols.SqlRankable,
    protocols.Optimizer,
    protocols.Backend,
    protocols.Runner,
)


def signature(name: str, func) -> str:
    # Annotations are strings (from __future__ import annotations); show them as written.
    return f"def {name}{inspect.signature(func)}".replace("'", "")


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_every_hook_is_documented_with_its_signature(name):
    assert signature(name, HOOKS[name]) in HOOKS_MD


def test_no_documented_hook_is_missing_from_the_code():
    documented = set(re.findall(r"def (gptstore_\w+)\(", HOOKS_MD))
    assert documented == set(HOOKS)


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.__name__)
def test_every_protocol_method_is_documented_with_its_signature(protocol):
    methods = [
        n for n, f in vars(protocol).items() if inspect.isfunction(f) and not n.startswith("_")
    ]
    assert methods
    assert f"class {protocol.__name__}(Protocol):" in HOOKS_MD
    for name in methods:
        assert signature(name, getattr(protocol, name)) in HOOKS_MD, name


def test_readme_names_the_setup_and_test_commands():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    test_command = re.search(r"<!-- test-command -->\s*```bash\n(.+?)\n```", readme, re.S)
    assert test_command, "README.md must hold the test command after <!-- test-command -->"
    assert test_command.group(1).strip() in ci


def documented_config(tmp_path, page):
    """The server config in ``docs/PAGE``'s one TOML block, checked as `gptstore serve` reads
    it."""
    from gptstore.config import Store
    from gptstore.server.settings import server_config

    [block] = re.findall(r"```toml\n(.*?)```", (REPO / "docs" / page).read_text(), re.S)
    (tmp_path / "serve.toml").write_text(block)
    return server_config(Store(tmp_path / "home"), tmp_path / "serve.toml")


def test_the_server_config_in_the_http_docs_is_accepted(tmp_path):

    checked = documented_config(tmp_path, "http.md")
    settings, specs = checked.settings, checked.deployments
    assert [k.role for k in settings.api_keys] == ["admin", "user"]
    assert (specs["smol"].backend, specs["smol"].max_batch, specs["smol"].max_queue) == (
        "onnx",
        8,
        64,
    )


def test_the_ray_engine_config_in_the_scale_out_docs_is_accepted(tmp_path):

    checked = documented_config(tmp_path, "scale-out.md")
    settings, specs = checked.settings, checked.deployments
    assert (settings.engine, settings.ray.address, settings.ray.replica_cpus) == (
        "ray",
        "10.0.0.5:6379",
        1.0,
    )
    assert specs["smollm2"].replicas == 4
    scaling = specs["chat"].autoscaling
    assert scaling is not None
    assert (scaling.min_replicas, scaling.max_replicas, specs["chat"].most_replicas()) == (1, 8, 8)


def test_the_example_server_config_is_accepted():
    from gptstore.config import Store
    from gptstore.server.settings import server_config

    path = REPO / "docs" / "examples" / "serve.toml"
    checked = server_config(Store(REPO / ".no-such-home"), path)
    settings, specs = checked.settings, checked.deployments
    assert settings.role_of(b"sk-demo") == "user"
    assert (specs["smollm2"].artifact, specs["smollm2"].backend) == ("smollm2-onnx", "onnx")
    ray = server_config(
        Store(REPO / ".no-such-home"), REPO / "docs" / "examples" / "serve-ray.toml"
    )
    assert (ray.settings.engine, ray.settings.ray.address) == ("ray", "127.0.0.1:6379")
    assert ray.deployments["smollm2"].artifact == "smollm2-domain"  # what the quickstart made


def test_the_rank_columns_table_is_the_contract():
    from gptstore.plugin import RANK_COLUMNS

    text = (REPO / "docs" / "plugins" / "hooks.md").read_text()
    documented = dict(re.findall(r"^\| `c\.(\w+)` \| (.+?) \|$", text, re.M))
    assert documented == RANK_COLUMNS


def test_every_name_of_the_import_surface_is_documented():
    import gptstore.plugin

    text = (REPO / "docs" / "plugins" / "hooks.md").read_text()
    missing = [name for name in gptstore.plugin.__all__ if f"`{name}" not in text]
    assert missing == []
