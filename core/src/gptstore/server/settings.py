"""``[server]`` and ``[deployments.NAME]``: from the store's config.toml, or from a file given to
``gptstore serve --config``; checked whole before the server listens."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from attrs import field, frozen

from gptstore.artifacts import ArtifactStore
from gptstore.config import Store, read_toml
from gptstore.converter import structure
from gptstore.errors import GptstoreError, InvalidInput
from gptstore.manager import PluginManager
from gptstore.serving.deployments import DeploymentSpec, Plan, check_name, plan

#: How ``gptstore serve --config FILE`` tells uvicorn's worker processes which file it checked.
SERVER_CONFIG_ENV = "GPTSTORE_SERVER_CONFIG"


def _check_key(_instance: Any, _attribute: Any, key: str) -> None:
    if not key or not key.isascii() or not key.isprintable() or " " in key:
        raise ValueError(
            "an API key must be non-empty printable ASCII without spaces (it travels in "
            "'Authorization: Bearer KEY')"
        )


@frozen
class ApiKey:
    """A key and what it may do: ``admin`` changes state, ``user`` only runs inference."""

    key: str = field(validator=_check_key)
    role: Literal["admin", "user"] = "user"


@frozen(kw_only=True)
class ServerSettings:
    """``[server]``: API keys, whether inference needs a key, and the largest request body."""

    api_keys: tuple[ApiKey, ...] = ()
    anonymous_inference: bool = False
    max_body_bytes: int = 1_048_576

    @cached_property
    def roles(self) -> dict[str, str]:
        """Each key's role (read by the API-key guard on every request)."""
        return {k.key: k.role for k in self.api_keys}


@frozen
class ServerConfig:
    """The server's settings and deployments, and the file each table came from."""

    settings: ServerSettings
    deployments: dict[str, DeploymentSpec]
    files: dict[str, str]


def server_config(store: Store, config: Path | None = None) -> ServerConfig:
    """``[server]`` and ``[deployments]``: from ``config`` (a TOML file) where it has them, else
    from the store's config.toml. Problems name the file and the setting."""
    raw = store.read_raw_config()
    files = {"server": str(store.config_path), "deployments": str(store.config_path)}
    if config is not None:
        extra = read_toml(config)
        unknown = sorted(set(extra) - {"server", "deployments"})
        if unknown:
            raise InvalidInput(
                str(config),
                [
                    f"unknown table(s) {', '.join(unknown)}; a server config has [server] and "
                    "[deployments.NAME]"
                ],
            )
        for table in ("server", "deployments"):
            if table in extra:
                raw[table], files[table] = extra[table], str(config)
    return parse_server_config(raw, files)


def parse_server_config(raw: dict[str, Any], files: dict[str, str]) -> ServerConfig:
    """The ``server`` and ``deployments`` tables of ``raw`` checked as ``gptstore serve`` reads
    them (``files`` names where each table came from, for messages)."""
    settings = structure(
        raw.get("server", {}),
        ServerSettings,
        what=f"[server] in {files['server']}",
        path="$.server",
    )
    specs = structure(
        raw.get("deployments", {}),
        dict[str, DeploymentSpec],
        what=f"[deployments] in {files['deployments']}",
        path="$.deployments",
    )
    for name in specs:
        try:
            check_name(name)
        except InvalidInput as exc:
            raise InvalidInput(f"[deployments] in {files['deployments']}", exc.problems) from None
    return ServerConfig(settings, specs, files)


def plan_deployments(
    config: ServerConfig, manager: PluginManager, artifacts: ArtifactStore
) -> dict[str, Plan]:
    """Check every deployment without loading it: its artifact exists, its backend is
    installed, its options are that backend's. All problems are reported at once, each naming
    the file and the place (``$.deployments.NAME.options.x``)."""
    plans: dict[str, Plan] = {}
    problems: list[str] = []
    for name, spec in config.deployments.items():
        where = f"$.deployments.{name}"
        try:
            plans[name] = plan(
                manager,
                artifacts,
                spec.artifact,
                spec.backend,
                spec.options,
                where=f"{where}.options",
            )
        except InvalidInput as exc:
            problems.extend(exc.problems)
        except GptstoreError as exc:
            problems.append(f"{exc} @ {where}")
    if problems:
        raise InvalidInput(f"[deployments] in {config.files['deployments']}", problems)
    return plans
