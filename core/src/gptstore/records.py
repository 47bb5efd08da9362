"""Registration records: what the four ``gptstore_*`` hooks yield.

Each record names a thing (``name``, normalized to lower case and validated), says what it is
(``description``), how to build it (``factory``) and what options it takes (``options_type``, an
attrs class structured with :mod:`gptstore.converter`, or None for no options). All four
factories take the same form, ``factory(options)``: options structured into ``options_type``
(None when the record has none), so one :func:`gptstore.manager.build` builds all four.

Factories are where heavy imports (torch, transformers, onnxruntime) belong: importing a plugin
module must stay cheap so ``gptstore --help`` is fast and a broken dependency breaks only the
plugin that needs it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar

from attrs import field, frozen

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def _normalize_name(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a registration name must be a string, got {type(value).__name__}")
    name = value.strip().lower()
    if not _NAME.match(name):
        raise ValueError(
            f"invalid registration name {value!r}: use 1-64 characters of a-z, 0-9, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return name


def _check_options_type(_instance: Any, _attribute: Any, value: Any) -> None:
    if value is not None and not (isinstance(value, type) and hasattr(value, "__attrs_attrs__")):
        raise TypeError(f"options_type must be an attrs class or None, got {value!r}")


@frozen(kw_only=True)
class _Registration:
    name: str = field(converter=_normalize_name)
    factory: Callable[..., Any] = field(eq=False)
    options_type: type | None = field(default=None, validator=_check_options_type)
    description: str = ""

    @factory.validator
    def _check_factory(self, _attribute: Any, value: Any) -> None:
        if not callable(value):
            raise TypeError(f"factory of {self.name!r} must be callable, got {value!r}")

    #: The extension point this kind of record registers, for messages and listings.
    kind: ClassVar[str] = "registration"


@frozen(kw_only=True)
class ModelSource(_Registration):
    """A place models come from. ``factory(options)`` returns a :class:`~gptstore.protocols.Source`.

    ``options`` is the source's table in ``config.toml`` (``[sources.NAME]``), structured into
    ``options_type`` (or None when ``options_type`` is None).
    """

    kind: ClassVar[str] = "model source"


@frozen(kw_only=True)
class ScoringPolicy(_Registration):
    """A way to rank models. ``factory(options)`` returns a :class:`~gptstore.protocols.Scorer`.

    ``options`` comes from ``[policies.NAME]`` in ``config.toml``; a new scorer is built for each
    selection.
    """

    kind: ClassVar[str] = "scoring policy"


@frozen(kw_only=True)
class OptimizationStrategy(_Registration):
    """A way to derive a model. ``factory(options)`` returns an
    :class:`~gptstore.protocols.Optimizer`.

    Options are per run (``gptstore optimize --option``, a recipe step): a new optimizer is built
    for each run.
    """

    kind: ClassVar[str] = "optimization strategy"


@frozen(kw_only=True)
class ServingBackend(_Registration):
    """A way to run a model. ``factory(options)`` returns a
    :class:`~gptstore.protocols.Backend`.

    Options are per deployment (``[deployments.NAME] options``): a new backend is built for each
    deployment.
    """

    kind: ClassVar[str] = "serving backend"


Registration = ModelSource | ScoringPolicy | OptimizationStrategy | ServingBackend
