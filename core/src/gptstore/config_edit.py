"""Changes to config.toml, checked as the code that reads each table will read it, and written
atomically: a wrong value is refused and the file is left as it was."""

from __future__ import annotations

import tomllib
from typing import Any

from attrs import fields_dict

from gptstore.config import Config, Store
from gptstore.converter import structure
from gptstore.errors import GptstoreError
from gptstore.manager import PluginManager, structure_options
from gptstore.records import ModelSource, ScoringPolicy


def set_config_value(store: Store, manager: PluginManager, key: str, text: str) -> tuple[Any, str]:
    """Set the dotted ``key`` (``sources.local.paths``) to ``text`` read as TOML when it parses
    (``["a", "b"]``, ``5``, ``true``) and as a plain string otherwise. Returns the value set and
    a warning ("" when none); raises GptstoreError, with config.toml unchanged, when the changed
    table is wrong."""
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise GptstoreError(
            f"config key {key!r}: write SECTION.NAME[.OPTION], e.g. sources.local.paths"
        )
    sections = list(fields_dict(Config))
    if parts[0] not in sections:
        raise GptstoreError(
            f"config key {key!r}: unknown section {parts[0]!r}; config.toml has "
            + ", ".join(sections)
        )
    try:
        parsed = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        parsed = text
    data = store.read_raw_config()
    table = data
    for part in parts[:-1]:
        child = table.setdefault(part, {})
        if not isinstance(child, dict):
            raise GptstoreError(f"config key {key!r}: {part} is a value, not a table")
        table = child
    table[parts[-1]] = parsed
    try:
        unchecked = check_table(manager, data, parts)
    except GptstoreError as exc:
        hint = ""
        if "required field missing" in str(exc) and not isinstance(parsed, dict):
            hint = (  # one key at a time cannot add a table whose keys are all required
                f"; set the required keys together as one table, e.g. gptstore config set "
                f"{'.'.join(parts[:2])} '{{ KEY = VALUE, OTHER = VALUE }}'"
            )
        raise GptstoreError(f"config set {key}: {exc}; config.toml is unchanged{hint}") from None
    store.write_raw_config(data)
    return parsed, unchecked


def check_table(manager: PluginManager, data: dict[str, Any], parts: list[str]) -> str:
    """Check the table of config.toml ``data`` that a ``config set`` of ``parts`` changed, as the
    code that reads it will: a source's or policy's table against its plugin's options, the
    server's tables as ``gptstore serve`` reads them. Returns why it could not be checked (no
    installed plugin provides that source or policy; one may be installed later), else ""."""
    config = structure(data, Config, what="config.toml")
    section, name = parts[0], parts[1]
    if section in ("sources", "policies"):
        record_type = {"sources": ModelSource, "policies": ScoringPolicy}[section]
        records = manager.registrations(record_type)
        if name not in records:
            return (
                f"no installed plugin provides a {record_type.kind} named {name!r} "
                f"(installed: {', '.join(sorted(records)) or 'none'}), so [{section}.{name}] "
                "was saved unchecked"
            )
        if section == "sources":
            # `enabled` is the core's switch, not the plugin's option.
            enabled = config.sources[name].get("enabled", True)
            structure(enabled, bool, what="config.toml", path=f"$.sources.{name}.enabled")
            options = config.source_options(name)
        else:
            options = config.policies[name]
        structure_options(records[name], options, where=f"$.{section}.{name}")
    elif section in ("server", "deployments"):
        from gptstore.server.settings import parse_server_config

        parse_server_config(data, {"server": "config.toml", "deployments": "config.toml"})
    return ""
