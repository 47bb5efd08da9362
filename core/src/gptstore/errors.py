"""Errors a user can act on.

Every error gptstore raises on purpose derives from :class:`GptstoreError`; the CLI prints its
message on one line and exits non-zero, the HTTP API turns it into a 4xx. The message says what
failed, on which input, and what to do instead.
"""

from __future__ import annotations


class GptstoreError(Exception):
    """Base class of the errors gptstore reports to users."""


class InvalidInput(GptstoreError):
    """Input that does not have the expected shape or values.

    ``problems`` holds one line per problem, each naming where it is (``expected int @ $.r``).
    """

    #: A machine-readable reason the HTTP API sends as the error's ``code`` (None: none).
    code: str | None = None

    def __init__(self, what: str, problems: list[str] | tuple[str, ...]) -> None:
        self.what = what
        self.problems = tuple(problems)
        super().__init__(f"invalid {what}: " + "; ".join(self.problems))


class ContextLengthExceeded(InvalidInput):
    """A prompt and its ``max_tokens`` that do not fit in the model's context."""

    code = "context_length_exceeded"


class UnknownName(GptstoreError):
    """A name asked for that no plugin registered."""

    def __init__(self, kind: str, name: str, valid: list[str] | tuple[str, ...]) -> None:
        self.kind = kind
        self.name = name
        self.valid = tuple(sorted(valid))
        choices = ", ".join(self.valid) if self.valid else "none are installed"
        super().__init__(f"unknown {kind} {name!r}; valid names: {choices}")


class PluginError(GptstoreError):
    """A plugin that cannot be used: import failure, bad hooks, bad records, name conflicts."""


class RefusedModel(GptstoreError):
    """A model folder or repository that gptstore will not load (pickle weights, remote code)."""


class CatalogError(GptstoreError):
    """The catalog cannot be opened or migrated, or a card is missing."""


class NotFound(GptstoreError):
    """A model, artifact or deployment that does not exist."""


class Conflict(GptstoreError):
    """Something that already exists under that name (HTTP 409)."""


class Cancelled(GptstoreError):
    """A long-running step stopped because it was asked to."""


class Unavailable(GptstoreError):
    """Something that cannot serve now but may later: a deployment being deleted, a closed model
    (HTTP 503)."""


class SwapFailed(GptstoreError):
    """A new version of a deployment failed to load, to answer its probes or to pass its gate;
    the version that was live still serves (HTTP 422)."""
