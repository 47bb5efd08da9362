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


# Separates a FieldProblem's message from its field until the path is known (see structure()).
_FIELD_MARK = "\x00"


class FieldProblem(ValueError):
    """A field's value out of bounds, raised by :func:`at_least` / :func:`in_range`: the
    structuring error names the field's place (``@ $.max_tokens``)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def at_least(low: float) -> Any:
    """An attrs validator: the value (when not None) is at least ``low``."""

    def check(_instance: Any, attribute: Any, value: float | None) -> None:
        if value is not None and value < low:
            raise FieldProblem(
                attribute.name,
                f"{attribute.name} must be at least {_number(low)}, got {_number(value)}",
            )

    check.json_schema = {"minimum": low}  # type: ignore[attr-defined]  # the OpenAPI schema's
    return check


def in_range(low: float, high: float, *, open_low: bool = False) -> Any:
    """An attrs validator: the value (when not None) lies in ``low..high`` (``(low, high]`` with
    ``open_low``)."""

    def check(_instance: Any, attribute: Any, value: float | None) -> None:
        if value is None:
            return
        if not (low < value if open_low else low <= value) or value > high:
            low_, high_ = _number(low), _number(high)
            bound = f"({low_}, {high_}]" if open_low else f"{low_}..{high_}"
            raise FieldProblem(
                attribute.name, f"{attribute.name} must lie in {bound}, got {_number(value)}"
            )

    lower = {"exclusive_minimum": low} if open_low else {"minimum": low}
    check.json_schema = {**lower, "maximum": high}  # type: ignore[attr-defined]
    return check


def _format_exception(exc: BaseException, type_: Any) -> str:
    # Our validators and strict hooks already say precisely what was wrong: keep their words.
    if isinstance(exc, FieldProblem):
        return f"{exc}{_FIELD_MARK}{exc.field}"
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


def _is_sequence(type_: Any) -> bool:
    """``list[X]`` or ``tuple[X, ...]``."""
    origin = typing.get_origin(type_)
    args = typing.get_args(type_)
    return (origin is list and len(args) == 1) or (
        origin is tuple and len(args) == 2 and args[1] is Ellipsis
    )


def _sequence_hook(converter: cattrs.Converter) -> Any:
    def factory(type_: Any) -> Any:
        origin, item_type = typing.get_origin(type_), typing.get_args(type_)[0]

        def structure(value: Any, _type: Any) -> Any:
            # cattrs would take any iterable: "" or {} as an empty list, a dict as its keys.
            if not isinstance(value, list | tuple):
                raise TypeError(f"expected a list, got {type(value).__name__}")
            items, errors = [], []
            for index, item in enumerate(value):
                try:
                    items.append(converter.structure(item, item_type))
                except Exception as exc:  # collected with its place, as cattrs does
                    note = cattrs.errors.IterableValidationNote(
                        f"Structuring {type_} @ index {index}", index, item_type
                    )
                    exc.__notes__ = [*getattr(exc, "__notes__", []), note]
                    errors.append(exc)
            if errors:
                raise cattrs.IterableValidationError(f"While structuring {type_!r}", errors, type_)
            return origin(items)

        return structure

    return factory


def _integral(value: Any, _type: Any) -> int:
    # JSON has one number type: clients (and JavaScript) may send 4.0 for 4.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return int(_strict(int, (int,))(value, int))


def make_converter(*, integral_floats: bool = False) -> cattrs.Converter:
    """Build a converter: strict scalars, ISO-8601 datetimes, paths as strings, no extra keys.

    ``integral_floats`` accepts 4.0 where an int is expected (JSON bodies of the HTTP API).
    """
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook(int, _integral if integral_floats else _strict(int, (int,)))
    converter.register_structure_hook(float, _strict(float, (int, float)))
    converter.register_structure_hook(str, _strict(str, (str,)))
    converter.register_structure_hook(bool, _strict(bool, (bool,)))
    converter.register_structure_hook(
        datetime, lambda v, _t: v if isinstance(v, datetime) else datetime.fromisoformat(v)
    )
    converter.register_unstructure_hook(datetime, lambda v: v.isoformat())
    converter.register_structure_hook(Path, lambda v, _t: Path(v))
    # A list must be a list: cattrs would structure any iterable into one.
    converter.register_structure_hook_factory(_is_sequence, _sequence_hook(converter))
    # cattrs would split "a/b" into ("a", "/", "b"): a list of strings must be a list.
    converter.register_structure_hook_func(_is_str_sequence, _structure_str_sequence)
    converter.register_unstructure_hook(Path, str)
    return converter


converter = make_converter()
#: For HTTP request bodies: the same rules, but JSON numbers like 4.0 are accepted as integers.
json_converter = make_converter(integral_floats=True)


def structure(
    data: Any, cls: type[T], *, what: str, path: str = "$", using: cattrs.Converter = converter
) -> T:
    """Structure ``data`` into ``cls``; on failure raise InvalidInput with one line per problem.

    Problems read like ``expected int @ $.options.r``.
    """
    try:
        return using.structure(data, cls)
    except InvalidInput as exc:
        raise InvalidInput(what, [f"{p} @ {path}" for p in exc.problems]) from None
    except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
        if isinstance(exc, cattrs.BaseValidationError):
            problems = [
                _place_field(line)
                for line in cattrs.transform_error(
                    exc, path=path, format_exception=_format_exception
                )
            ]
        else:
            where = f"{path}.{exc.field}" if isinstance(exc, FieldProblem) else path
            problems = [f"{_format_exception(exc, None)} @ {where}"]
        raise InvalidInput(what, problems) from None


def _place_field(line: str) -> str:
    """``"x must ...<mark>x @ $.a"`` -> ``"x must ... @ $.a.x"``."""
    message, mark, rest = line.partition(_FIELD_MARK)
    if not mark:
        return line
    field, _at, where = rest.partition(" @ ")
    return f"{message} @ {where}.{field}"


def unstructure(value: Any) -> Any:
    return converter.unstructure(value)
