"""``[server]`` and ``[deployments.NAME]`` in config.toml."""

from __future__ import annotations

from functools import cached_property
from typing import Any, Literal

from attrs import Factory, field, frozen


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


@frozen(kw_only=True)
class DeploymentSpec:
    """``[deployments.NAME]``: an artifact served on a backend, loaded when the server starts.

    Requests are decoded in batches of up to ``max_batch`` rows; at most ``max_queue`` requests
    wait, and more are refused with 429 and Retry-After.
    """

    artifact: str
    backend: str
    options: dict[str, Any] = Factory(dict)
    max_batch: int = 8
    max_queue: int = 64
