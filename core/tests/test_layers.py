"""The layers of core as docs/architecture.md draws them: a module imports only from its own
layer and the layers before it (imports under TYPE_CHECKING included)."""

from __future__ import annotations

import ast
from pathlib import Path

import gptstore

ROOT = Path(gptstore.__file__).parent
#: In order; a module's layer is the first prefix that matches its dotted name.
LAYERS = (
    ("gptstore", "gptstore.errors", "gptstore.converter", "gptstore.units", "gptstore.files",
     "gptstore.config"),
    ("gptstore.hookspecs", "gptstore.records", "gptstore.protocols", "gptstore.types",
     "gptstore.manager"),
    ("gptstore.modelfiles", "gptstore.builtins", "gptstore.builtins.local"),
    ("gptstore.scoring",),
    ("gptstore.catalog",),
    ("gptstore.builtins.scoring", "gptstore.selection"),
    ("gptstore.artifacts",),
    ("gptstore.sync", "gptstore.builtins.store"),
    ("gptstore.serving",),
    ("gptstore.optimization",),
    ("gptstore.deploy",),
    ("gptstore.plugin",),
    ("gptstore.server", "gptstore.cli", "gptstore.config_edit"),
    ("gptstore.testing",),
)  # fmt: skip


def layer(module: str) -> int:
    best = (-1, -1)  # (prefix length, layer)
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            # "gptstore" (the package's __init__) is itself only, not a prefix of everything.
            inside = module.startswith(prefix + ".") and prefix != "gptstore"
            if (module == prefix or inside) and len(prefix) > best[0]:
                best = (len(prefix), index)
    assert best[1] >= 0, f"{module} is in no layer; add it to LAYERS and to the architecture page"
    return best[1]


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def test_no_module_imports_from_a_later_layer():
    upward = []
    for name, path in modules():
        own = layer(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] == "gptstore" and layer(target) > own:
                    upward.append(f"{name} imports {target}")
    assert upward == []
