"""``[server]`` and ``[deployments.NAME]``: from the store's config.toml, or from a file given to
``gptstore serve --config``; checked whole before the server listens."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Any, Literal

from attrs import evolve, field, frozen

from gptstore.artifacts import ArtifactStore
from gptstore.config import Store, read_toml
from gptstore.converter import FieldProblem, in_range, structure
from gptstore.deploy.ray_engine import RaySettings
from gptstore.errors import GptstoreError, InvalidInput
from gptstore.manager import PluginManager
from gptstore.serving.deployments import DeploymentSpec, Plan, check_engine, check_name, plan

#: How ``gptstore serve --config FILE`` tells uvicorn's worker processes which file it checked.
SERVER_CONFIG_ENV = "GPTSTORE_SERVER_CONFIG"


#: How a hashed key is written: ``key = "sha256:<64 hex digits>"``.
HASH_PREFIX = "sha256:"
_HEX = frozenset("0123456789abcdef")


def key_problem(key: str) -> str:
    """Why ``key`` cannot be an API key ("" when it can): keys travel in
    ``Authorization: Bearer KEY``, so they are printable ASCII without spaces."""
    if not key or not key.isascii() or not key.isprintable() or " " in key:
        return (
            "an API key must be non-empty printable ASCII without spaces (it travels in "
            "'Authorization: Bearer KEY')"
        )
    return ""


def hash_key(key: str) -> str:
    """``sha256:<hex>`` of ``key``: what config.toml may hold instead of the key itself."""
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def _digest(value: str, field_name: str, source: str) -> tuple[str, bytes]:
    """The sha256 digest a configured key stands for, and the value as kept: a
    ``sha256:<hex>`` value is a digest already (its hex is kept lowercase), a plain key is
    hashed here. ``source`` says where the value came from, for messages (never the value
    itself: it may be a secret)."""
    if value[: len(HASH_PREFIX)].lower() == HASH_PREFIX:
        hex_digest = value[len(HASH_PREFIX) :].lower()
        if len(hex_digest) != 64 or not set(hex_digest) <= _HEX:
            raise FieldProblem(
                field_name,
                f"{source} starts with {HASH_PREFIX!r} but is not followed by 64 hex digits; "
                "write sha256:<hex of the sha256 of the key>, as `gptstore key hash` prints it",
            )
        return HASH_PREFIX + hex_digest, bytes.fromhex(hex_digest)
    problem = key_problem(value)
    if problem:
        raise FieldProblem(field_name, problem if field_name == "key" else f"{source}: {problem}")
    return value, hashlib.sha256(value.encode()).digest()


def _check_env(_instance: Any, attribute: Any, name: str | None) -> None:
    if name is not None and (not name or "=" in name or "\x00" in name):
        raise FieldProblem(
            attribute.name, "env must name an environment variable, e.g. GPTSTORE_API_KEY"
        )


@frozen
class ApiKey:
    """A key and what it may do: ``admin`` changes state, ``user`` only runs inference.

    The key is given by exactly one of ``key`` (the key itself, or ``sha256:<hex>``: its hash,
    so that config.toml holds no secret) and ``env`` (the name of an environment variable that
    holds either; read when the config is checked, before the server listens). A presented key
    is recognised by its sha256 ``digest`` alone."""

    key: str | None = field(default=None, repr=False)
    env: str | None = field(default=None, validator=_check_env)
    role: Literal["admin", "user"] = "user"
    #: sha256 of the key: what a presented key's sha256 is compared with.
    digest: bytes = field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        key, env = self.key, self.env
        if key is not None and env is None:
            key, digest = _digest(key, "key", "the key")
            object.__setattr__(self, "key", key)  # a hash's hex in lowercase
        elif env is not None and key is None:
            value = os.environ.get(env, "")
            if not value:
                raise FieldProblem(
                    "env",
                    f"environment variable {env} is not set or is empty; set it to the key "
                    "(or to its sha256:<hex>) in the environment the server starts in",
                )
            _value, digest = _digest(value, "env", f"environment variable {env}")
        else:
            raise ValueError(
                'give an API key as either key = "KEY" (or "sha256:<hex>": its hash, which '
                '`gptstore key hash` prints) or env = "VARIABLE" (an environment variable '
                "that holds it)" + (", not both" if key is not None else "")
            )
        object.__setattr__(self, "digest", digest)


def _check_unique(_instance: Any, attribute: Any, keys: tuple[ApiKey, ...]) -> None:
    first: dict[bytes, int] = {}
    for index, key in enumerate(keys):
        if key.digest in first:
            raise FieldProblem(
                attribute.name,
                f"api_keys[{first[key.digest]}] and api_keys[{index}] are the same key; "
                "give each key once, with its role",
            )
        first[key.digest] = index


@frozen(kw_only=True)
class ServerSettings:
    """``[server]``: API keys, whether inference needs a key, the largest request body, the
    most replicas (model copies) the server runs over all its deployments, swaps included, the
    most optimization jobs it runs at once, and the engine that runs replicas."""

    api_keys: tuple[ApiKey, ...] = field(default=(), validator=_check_unique)
    anonymous_inference: bool = False
    max_body_bytes: int = 1_048_576
    max_replicas: int = field(default=16, validator=in_range(1, 1024))
    #: Optimization jobs that run at once (the others wait their turn).
    max_jobs: int = field(default=1, validator=in_range(1, 64))
    #: Where replicas run: processes on this host ("local"), or a Ray cluster's Serve ("ray",
    #: set up by [server.ray]).
    engine: Literal["local", "ray"] = "local"
    ray: RaySettings = field(factory=RaySettings)

    def key_id(self, key: bytes) -> str:
        """How version histories name the key that made a change: the first 12 hex digits of
        its sha256 (enough to tell keys apart, useless to recover one)."""
        return "key sha256:" + hashlib.sha256(key).hexdigest()[:12]

    def role_of(self, key: bytes) -> str | None:
        """The role of a presented key (as sent, ASCII bytes), None when it is no configured
        key. One sha256, then a constant-time comparison with every configured digest: no
        early exit, so the time taken says nothing about which keys exist. (Read by the
        API-key guard on every request.)"""
        digest = hashlib.sha256(key).digest()
        role = None
        for configured in self.api_keys:
            if hmac.compare_digest(configured.digest, digest):
                role = configured.role
        return role


@frozen
class ServerConfig:
    """The server's settings and deployments, and the file each table came from."""

    settings: ServerSettings
    deployments: dict[str, DeploymentSpec]
    files: dict[str, str]


def server_config(
    store: Store,
    config: Path | None = None,
    *,
    engine: Literal["local", "ray"] | None = None,
    ray_address: str | None = None,
) -> ServerConfig:
    """``[server]`` and ``[deployments]``: from ``config`` (a TOML file) where it has them, else
    from the store's config.toml; ``engine`` and ``ray_address`` (``gptstore serve`` options)
    replace ``[server] engine`` and ``[server.ray] address``. Problems name the file and the
    setting."""
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
    checked = parse_server_config(raw, files)
    if engine is None and ray_address is None:
        return checked
    settings = checked.settings
    if ray_address is not None:
        settings = evolve(settings, ray=evolve(settings.ray, address=ray_address))
    if engine is not None:
        settings = evolve(settings, engine=engine)
    return ServerConfig(settings, checked.deployments, checked.files)


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
            check_engine(name, spec, config.settings.engine, where)
            plans[name] = plan(
                manager,
                artifacts,
                spec.artifact,
                spec.backend,
                spec.options,
                adapters=spec.adapters,
                where=f"{where}.options",
                adapters_where=f"{where}.adapters",
            )
        except InvalidInput as exc:
            problems.extend(exc.problems)
        except GptstoreError as exc:
            problems.append(f"{exc} @ {where}")
    served: dict[str, str] = {name: name for name in config.deployments}
    for name, spec in config.deployments.items():
        for i, adapter in enumerate(spec.adapters):
            if adapter in served:
                problems.append(
                    f"model name {adapter!r} is taken by deployment {served[adapter]!r}: an "
                    f"adapter is served as a model of its own @ $.deployments.{name}.adapters[{i}]"
                )
            served[adapter] = name
    if problems:
        raise InvalidInput(f"[deployments] in {config.files['deployments']}", problems)
    return plans
