"""The one cattrs converter gptstore uses, and structuring that reports where input was wrong.

Never use cattrs' global converter: plugins may register hooks on it and change our wire format.
"""

from __future__ import annotations

import typing
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import cattrs

from gptstore.errors import InvalidInput

T = TypeVar("T")


def _strict(kind: type, accepts: tuple[type, ...]) -> Any:
    def structure(value: Any, _type: Any) -> Any:
        # bool is an int subclass; "3" is not an int. Reject both instead of coercing silently.
        if isinstance(value, bool) and kind is not bool:
            raise TypeError(f"expected {kind.__name__}, got a boolean")
        if not isinstance(value, accepts):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return kind(value)

    return structure


def _format_exception(exc: BaseException, type_: Any) -> str:
    # Our validators and strict hooks already say precisely what was wrong: keep their words.
    if isinstance(exc, InvalidInput):
        return "; ".join(exc.problems)
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, (ValueError, TypeError)) and str(exc):
        return str(exc)
    return cattrs.v.format_exception(exc, type_)


def _is_str_sequence(type_: Any) -> bool:
    origin = typing.get_origin(type_)
    args = typing.get_args(type_)
    return (
        origin in (tuple, list)
        and args in ((str, ...), (str,))
        and not (origin is tuple and args == (str,))
    )


def _structure_str_sequence(value: Any, type_: Any) -> Any:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise TypeError(f"expected a list of strings, got {type(value).__name__}")
    items = [_strict(str, (str,))(item, str) for item in value]
    return typing.get_origin(type_)(items)


def make_converter() -> cattrs.Converter:
    """Build a converter: strict scalars, ISO-8601 datetimes, paths as strings, no extra keys."""
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook(int, _strict(int, (int,)))
    converter.register_structure_hook(float, _strict(float, (int, float)))
    converter.register_structure_hook(str, _strict(str, (str,)))
    converter.register_structure_hook(bool, _strict(bool, (bool,)))
    converter.register_structure_hook(
        datetime, lambda v, _t: v if isinstance(v, datetime) else datetime.fromisoformat(v)
    )
    converter.register_unstructure_hook(datetime, lambda v: v.isoformat())
    converter.register_structure_hook(Path, lambda v, _t: Path(v))
    # cattrs would split "a/b" into ("a", "/", "b"): a list of strings must be a list.
    converter.register_structure_hook_func(_is_str_sequence, _structure_str_sequence)
    converter.register_unstructure_hook(Path, str)
    return converter


converter = make_converter()


def structure(data: Any, cls: type[T], *, what: str, path: str = "$") -> T:
    """Structure ``data`` into ``cls``; on failure raise InvalidInput with one line per problem.

    Problems read like ``expected int @ $.options.r``.
    """
    try:
        return converter.structure(data, cls)
    except InvalidInput as exc:
        raise InvalidInput(what, [f"{p} @ {path}" for p in exc.problems]) from None
    except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
        if isinstance(exc, cattrs.BaseValidationError):
            problems = cattrs.transform_error(exc, path=path, format_exception=_format_exception)
        else:
            problems = [f"{_format_exception(exc, None)} @ {path}"]
        raise InvalidInput(what, problems) from None


def unstructure(value: Any) -> Any:
    return converter.unstructure(value)
