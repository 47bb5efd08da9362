"""OpenAPI fuzz: schemathesis generates at least 200 requests for every operation that takes
input, from the server's own OpenAPI schema (valid and invalid ones: its examples, coverage and
fuzzing phases), and sends them with an admin key to a real server on 127.0.0.1 that serves the
echo backend over a store with a catalog and artifacts. Every answer must pass every schemathesis
check: no 5xx, a status, headers and a body (streamed events included) that the schema describes,
invalid requests refused and valid ones accepted (apart from the exceptions in
tests/schemathesis.toml, each with its reason).

So that generated requests reach the handlers' real work rather than a 404, some of them are
aimed at what the store holds: most inference requests name the deployment ``echo``, and about
half of the card, artifact and deployment lookups name one that exists (a name is free text or
matches its pattern, so the request stays exactly as valid or invalid as it was generated;
schemathesis checks the edited case again). ``DELETE /store/deployments/{name}`` and ``POST
/store/deployments`` get what schemathesis generates: they may delete or create deployments,
which is fine as long as nothing answers a 5xx. Deterministic: hypothesis is derandomized and
keeps no example database.
"""

from __future__ import annotations

import json
import tempfile
import urllib.request
import zlib
from collections import Counter
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, settings

import gptstore.testing.echo
from gptstore.catalog import Catalog
from gptstore.manager import make_plugin_manager
from gptstore.server import create_app
from gptstore.testing import add_artifact, running_server
from gptstore.testing.echo import echo_artifact
from gptstore.testing.synthetic import synthetic_cards

pytestmark = pytest.mark.slow  # about a minute
schemathesis = pytest.importorskip("schemathesis")

CONFIG = Path(__file__).parents[1] / "schemathesis.toml"
ADMIN = "sk-admin-reliability"
EXAMPLES = 200
CARDS = list(synthetic_cards(300, seed=3))
#: operation -> (where, key, values): a generated string there is replaced by one of the values,
#: or kept (one chance more than there are values), chosen by a hash of the generated string.
AIMS = {
    "POST /v1/completions": ("body", "model", ("echo", "echo", "echo")),
    "POST /v1/chat/completions": ("body", "model", ("echo", "echo", "echo")),
    "GET /store/models/{uid}": ("path", "uid", (CARDS[0].uid, CARDS[1].model_id)),
    "GET /store/artifacts/{artifact_id}": ("path", "artifact_id", ("echo-child",)),
    "GET /store/deployments/{name}": ("path", "name", ("echo",)),
}
#: Cases run per operation ("POST /v1/completions" -> count), and the operations with a failure,
#: for the last test.
CASES: Counter[str] = Counter()
FAILED: set[str] = set()


def _manager():
    manager = make_plugin_manager(entrypoints=False)
    manager.register_plugin(gptstore.testing.echo, "echo")
    return manager


def _openapi() -> dict:
    """The app's OpenAPI schema, made without serving it: schemathesis needs the operations when
    pytest collects the tests (its lazy loader, from_fixture, does not run on pytest 9)."""
    with tempfile.TemporaryDirectory() as folder:
        return create_app(Path(folder) / "home", manager=_manager()).openapi_schema.to_schema()


OPENAPI = _openapi()
schema = schemathesis.openapi.from_dict(OPENAPI, config=schemathesis.Config.from_path(CONFIG))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    home = root / "home"
    echo_artifact(home / "artifacts")
    (root / "child").mkdir()
    (root / "child" / "echo.json").write_text('{"backend": "echo", "uppercase": true}')
    add_artifact(home / "artifacts", root / "child", "echo-child", parent="echo", kind="echo")
    Catalog(home / "catalog.db").upsert(CARDS, source="synthetic")
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "server": {"api_keys": [{"key": ADMIN, "role": "admin"}]},
                "deployments": {"echo": {"artifact": "echo", "backend": "echo"}},
            }
        )
    )
    with running_server(create_app(home, manager=_manager())) as base:
        yield base


def test_the_server_serves_the_schema_the_cases_come_from(server):
    with urllib.request.urlopen(f"{server}/schema/openapi.json") as answer:
        assert json.load(answer) == OPENAPI


def _label(case) -> str:
    return f"{case.operation.method.upper()} {case.operation.path}"


def _aim(case) -> None:
    if _label(case) not in AIMS:
        return
    where, key, values = AIMS[_label(case)]
    container = case.body if where == "body" else case.path_parameters
    if isinstance(container, dict) and isinstance(container.get(key), str):
        pick = zlib.crc32(container[key].encode("utf-8", "surrogatepass")) % (len(values) + 1)
        if pick < len(values):
            container[key] = values[pick]


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_error_and_no_schema_violation(case, server):
    CASES[_label(case)] += 1
    _aim(case)
    try:
        case.call_and_validate(
            base_url=server, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60
        )
    except BaseException:
        FAILED.add(_label(case))  # hypothesis stops early to shrink: fewer cases
        raise


def test_every_operation_with_inputs_ran_its_cases():
    """An operation without parameters or body has only a few distinct requests to make
    (hypothesis stops when it has made them all); every other one ran at least EXAMPLES."""
    if not CASES:
        pytest.skip("the fuzz test did not run")
    low = {
        label: count
        for label, count in CASES.items()
        if count < EXAMPLES and label not in FAILED and _has_inputs(label)
    }
    assert not low, f"operations that ran fewer than {EXAMPLES} cases: {low}"


def _has_inputs(label: str) -> bool:
    method, _space, path = label.partition(" ")
    operation = schema[path][method]
    return bool(operation.body or any(True for _ in operation.iter_parameters()))
