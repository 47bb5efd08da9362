"""The plugin manager: built-ins and installed plugins on one pluggy manager.

Entry points of the group ``gptstore`` load one at a time. A plugin that fails to import, whose
hooks do not match the specs, or whose hook raises or returns something other than records, is
skipped with a :class:`PluginLoadWarning` naming it, its package and how to silence it, and kept
as a failed :class:`PluginInfo`, so ``gptstore plugins`` and the API can show what went wrong; an
error raised by the plugin's code says where (file, line and source line).
``GPTSTORE_STRICT_PLUGINS=1`` raises instead. ``GPTSTORE_DISABLED_PLUGINS=a,b`` blocks plugins by
name; ``GPTSTORE_LOAD_PLUGINS=a,b`` loads only those installed plugins (built-ins stay unless
disabled).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import linecache
import os
import traceback
import warnings
from collections.abc import Iterable
from types import ModuleType
from typing import Any, Literal, TypeVar

import pluggy
from attrs import evolve, frozen

from gptstore import hookspecs
from gptstore.converter import structure
from gptstore.errors import InvalidInput, PluginError, UnknownName
from gptstore.records import (
    ModelSource,
    OptimizationStrategy,
    ScoringPolicy,
    ServingBackend,
    _Registration,
)

ENTRY_POINT_GROUP = "gptstore"
#: Built-in plugins: registered like any other, under these plugin names.
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("gptstore.local", "gptstore.builtins.local"),
    ("gptstore.scoring", "gptstore.builtins.scoring"),
    ("gptstore.store", "gptstore.builtins.store"),
)
_HOOK_RECORDS: dict[str, type[_Registration]] = {
    "gptstore_model_sources": ModelSource,
    "gptstore_scoring_policies": ScoringPolicy,
    "gptstore_optimization_strategies": OptimizationStrategy,
    "gptstore_serving_backends": ServingBackend,
}
R = TypeVar("R", bound=_Registration)


class PluginLoadWarning(UserWarning):
    """A plugin was skipped; ``gptstore plugins`` shows why."""


@frozen(kw_only=True)
class PluginInfo:
    """One plugin as ``gptstore plugins`` shows it."""

    name: str
    module: str | None = None
    distribution: str | None = None
    version: str | None = None
    hooks: tuple[str, ...] = ()
    status: Literal["loaded", "failed", "disabled"] = "loaded"
    error: str | None = None
    builtin: bool = False

    @property
    def package(self) -> str:
        """The distribution it comes from, for messages: ``gptstore-lora 0.1``."""
        if not self.distribution:
            return "an unknown package"
        return " ".join(part for part in (self.distribution, self.version) if part)

    @property
    def provider(self) -> str:
        """Who provides it, for messages: ``gptstore-lora 0.1 (plugin lora)``."""
        role = "built-in" if self.builtin else "plugin"
        return f"{self.package} ({role} {self.name})"


def _env_names(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None or not value.strip():
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def _raised_at(exc: BaseException, info: PluginInfo) -> str | None:
    """Where the plugin's code raised ``exc``: ``file:line: source line``.

    The last traceback frame in the plugin's own modules (its top-level package; only its module
    for a built-in, which shares the ``gptstore`` package with the core), else the last frame;
    for a SyntaxError, the place it names. None when there is no traceback.
    """
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        return f"{exc.filename}:{exc.lineno}: {(exc.text or '').strip()}"
    root = (info.module or "").partition(":")[0]
    if not info.builtin:
        root = root.split(".")[0]
    own = last = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        last = (frame.f_code.co_filename, lineno)
        module = str(frame.f_globals.get("__name__", ""))
        if root and (module == root or module.startswith(f"{root}.")):
            own = last
    picked = own or last
    if picked is None:
        return None
    filename, lineno = picked
    source = linecache.getline(filename, lineno).strip()
    return f"{filename}:{lineno}: {source}" if source else f"{filename}:{lineno}"


def _describe(exc: BaseException, info: PluginInfo) -> str:
    """``TypeName: message (at file:line: source)`` for an exception raised by a plugin."""
    where = _raised_at(exc, info)
    return f"{type(exc).__name__}: {exc}" + (f" (at {where})" if where else "")


def _gptstore_version() -> str | None:
    try:
        return importlib.metadata.version("gptstore")
    except importlib.metadata.PackageNotFoundError:
        return None


class PluginManager(pluggy.PluginManager):
    """pluggy's manager with gptstore's loading rules and typed access to records."""

    def __init__(self, *, strict: bool | None = None) -> None:
        super().__init__(ENTRY_POINT_GROUP)
        self.add_hookspecs(hookspecs)
        self.strict = (
            os.environ.get("GPTSTORE_STRICT_PLUGINS", "") not in ("", "0")
            if strict is None
            else strict
        )
        self._infos: dict[str, PluginInfo] = {}

    # -- loading --------------------------------------------------------------------------------

    def load_builtins(self) -> None:
        """Register :data:`DEFAULT_PLUGINS` (unless disabled by ``GPTSTORE_DISABLED_PLUGINS``)."""
        for name, module_name in DEFAULT_PLUGINS:
            info = PluginInfo(
                name=name,
                module=module_name,
                distribution="gptstore",
                version=_gptstore_version(),
                builtin=True,
            )
            if self._disabled(info):
                continue
            self._load(info, lambda m=module_name: importlib.import_module(m))

    def load_entrypoints(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Import and register every installed plugin of ``group``, one at a time."""
        only = _env_names("GPTSTORE_LOAD_PLUGINS")
        for entry_point in importlib.metadata.entry_points(group=group):
            dist = entry_point.dist
            info = PluginInfo(
                name=entry_point.name,
                module=entry_point.value,
                distribution=dist.name if dist else None,
                version=dist.version if dist else None,
            )
            if self._taken(info):
                continue
            if only is not None and entry_point.name not in only:
                self._infos[info.name] = evolve(
                    info, status="disabled", error="not listed in GPTSTORE_LOAD_PLUGINS"
                )
                continue
            if self._disabled(info):
                continue
            self._load(info, entry_point.load)

    def register_plugin(
        self, plugin: Any, name: str, *, distribution: str | None = None, version: str | None = None
    ) -> PluginInfo:
        """Register an object or module holding hook implementations (tests, embedding apps)."""
        info = PluginInfo(
            name=name,
            module=plugin.__name__ if isinstance(plugin, ModuleType) else None,
            distribution=distribution,
            version=version,
        )
        if name in self._infos:
            raise PluginError(
                f"plugin name {name!r} is already taken by {self._infos[name].provider}"
            )
        self._load(info, lambda: plugin)
        return self._infos[name]

    def unregister_plugin(self, name: str) -> None:
        if self.get_plugin(name) is not None:
            self.unregister(name=name)
        self._infos.pop(name, None)

    def _taken(self, info: PluginInfo) -> bool:
        """Whether another plugin holds ``info.name``; if so, record ``info`` beside it."""
        other = self._infos.get(info.name)
        if other is None:
            return False
        self._fail(
            info,
            f"plugin name {info.name!r} is already taken by {other.provider}",
            key=f"{info.name} ({info.provider})",
            # Disabling the name would block the plugin that holds it as well.
            hint=f"uninstall {info.distribution or 'it'} to silence this"
            if other.builtin
            else "uninstall one of the two packages to silence this",
        )
        return True

    def _disabled(self, info: PluginInfo) -> bool:
        if info.name not in (_env_names("GPTSTORE_DISABLED_PLUGINS") or set()):
            return False
        self.set_blocked(info.name)
        self._infos[info.name] = evolve(
            info, status="disabled", error="disabled by GPTSTORE_DISABLED_PLUGINS"
        )
        return True

    def _load(self, info: PluginInfo, load: Any) -> None:
        try:
            plugin = load()
        except Exception as exc:  # a broken plugin breaks only itself
            self._fail(info, f"import failed: {_describe(exc, info)}", exc)
            return
        try:
            self.register(plugin, name=info.name)
        except Exception as exc:
            self._fail(info, f"bad hooks: {exc}", exc)
            return
        unknown = [
            caller.name for caller in self.get_hookcallers(plugin) or [] if not caller.has_spec()
        ]
        if unknown:
            self.unregister(plugin)
            known = ", ".join(_HOOK_RECORDS)
            self._fail(
                info,
                f"bad hooks: {', '.join(sorted(unknown))} "
                f"{'is not a gptstore hook' if len(unknown) == 1 else 'are not gptstore hooks'}"
                f" (known hooks: {known})",
            )
            return
        hooks = tuple(sorted(caller.name for caller in self.get_hookcallers(plugin) or []))
        self._infos[info.name] = evolve(info, hooks=hooks, status="loaded")

    def _fail(
        self,
        info: PluginInfo,
        message: str,
        exc: BaseException | None = None,
        *,
        key: str | None = None,
        hint: str | None = None,
    ) -> None:
        if self.strict:
            raise PluginError(f'Error loading plugin "{info.name}": {message}') from exc
        self._infos[key or info.name] = evolve(info, status="failed", error=message)
        if hint is None:
            hint = f"run with GPTSTORE_DISABLED_PLUGINS={info.name} to skip it quietly"
            if exc is not None:
                hint += ", or GPTSTORE_STRICT_PLUGINS=1 for the traceback"
        role = ", built-in" if info.builtin else ""
        warnings.warn(
            f"skipped plugin {info.name!r} ({info.package}{role}): {message}; {hint}",
            PluginLoadWarning,
            stacklevel=3,
        )

    # -- introspection --------------------------------------------------------------------------

    def plugin_infos(self) -> list[PluginInfo]:
        """Every plugin seen: loaded, failed or disabled, built-ins first."""
        return sorted(self._infos.values(), key=lambda i: (not i.builtin, i.name))

    def _records(self, hook_name: str) -> list[tuple[_Registration, PluginInfo]]:
        record_type = _HOOK_RECORDS[hook_name]
        collected: list[tuple[_Registration, PluginInfo]] = []
        for impl in reversed(getattr(self.hook, hook_name).get_hookimpls()):
            info = self._infos.get(impl.plugin_name) or PluginInfo(name=impl.plugin_name)
            try:
                produced = impl.function()
                items = (
                    []
                    if produced is None
                    else ([produced] if isinstance(produced, _Registration) else list(produced))
                )
            except Exception as exc:
                self._fail(info, f"{hook_name} failed: {_describe(exc, info)}", exc)
                continue
            bad = [item for item in items if not isinstance(item, record_type)]
            if bad:
                self._fail(
                    info, f"{hook_name} must yield {record_type.__name__} records, got {bad[0]!r}"
                )
                continue
            collected.extend((item, info) for item in items)
        return collected

    def registrations(self, record_type: type[R]) -> dict[str, R]:
        """Records of one extension point by name; two with one name raise PluginError."""
        hook_name = next(h for h, t in _HOOK_RECORDS.items() if t is record_type)
        found: dict[str, tuple[_Registration, PluginInfo]] = {}
        for record, info in self._records(hook_name):
            if record.name in found:
                first = found[record.name][1]
                raise PluginError(
                    f"{record.kind} {record.name!r} is registered twice: by {first.provider} and "
                    f"by {info.provider}; uninstall one or disable it with "
                    f"GPTSTORE_DISABLED_PLUGINS={info.name}"
                )
            found[record.name] = (record, info)
        return {name: record for name, (record, _info) in found.items()}  # type: ignore[misc]

    def providers(self, record_type: type[_Registration]) -> dict[str, PluginInfo]:
        """Record name -> the plugin that registered it."""
        hook_name = next(h for h, t in _HOOK_RECORDS.items() if t is record_type)
        return {record.name: info for record, info in self._records(hook_name)}

    def get(self, record_type: type[R], name: str) -> R:
        """The record called ``name``, or UnknownName listing the valid names."""
        records = self.registrations(record_type)
        key = name.strip().lower()
        if key not in records:
            raise UnknownName(record_type.kind, name, list(records))
        return records[key]


def structure_options(record: _Registration, options: Any | None, *, where: str = "$") -> Any:
    """Raw ``options`` structured into the record's ``options_type`` (None when it has none; a
    record without an options type refuses any option)."""
    if record.options_type is None:
        if options:
            raise InvalidInput(
                f"options of {record.kind} {record.name!r}",
                [f"it takes no options, got {', '.join(sorted(options))} @ {where}"],
            )
        return None
    return structure(
        options or {},
        record.options_type,
        what=f"options of {record.kind} {record.name!r}",
        path=where,
    )


def build(record: _Registration, options: Any | None = None, *, where: str = "$") -> Any:
    """Structure raw ``options`` into the record's ``options_type`` and call its factory.

    Sources and policies take options at construction; this is how the core builds them.
    (Strategies and backends take theirs per call: see :func:`structure_options`.)
    """
    return record.factory(structure_options(record, options, where=where))


def make_plugin_manager(
    *,
    entrypoints: bool = True,
    builtins: bool = True,
    strict: bool | None = None,
    extra: Iterable[tuple[str, ModuleType | object]] = (),
) -> PluginManager:
    """The host: a manager with built-ins, installed plugins and ``extra`` (name, plugin) pairs."""
    manager = PluginManager(strict=strict)
    if builtins:
        manager.load_builtins()
    if entrypoints:
        manager.load_entrypoints()
    for name, plugin in extra:
        manager.register_plugin(plugin, name)
    return manager


def import_reference(reference: str) -> Any:
    """What ``module`` or ``module:attribute`` names, imported."""
    module, _, attribute = reference.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attribute) if attribute else loaded


def importable_plugins(manager: PluginManager) -> list[dict[str, str]]:
    """The plugins ``manager`` loaded (built-ins aside) that another process can import again:
    ``{"name", "module"}`` each, for :func:`plugins_of` there."""
    return [
        {"name": info.name, "module": info.module}
        for info in manager.plugin_infos()
        if info.status == "loaded" and not info.builtin and info.module
    ]


def plugins_of(plugins: Iterable[dict[str, str]]) -> PluginManager:
    """A manager, in a worker process, with the built-ins and ``plugins`` (from
    :func:`importable_plugins` in the process that started it)."""
    manager = make_plugin_manager(entrypoints=False, strict=True)
    for plugin in plugins:
        manager.register_plugin(import_reference(plugin["module"]), plugin["name"])
    return manager
