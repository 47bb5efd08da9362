"""The core stays light: no torch, transformers or onnxruntime on import or for --help."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "onnxruntime", "optimum", "peft")

PROBE = """
import sys
{code}
heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r}))
print(','.join(heavy) or 'none')
"""


def _heavy_after(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(code=code, heavy=HEAVY)],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def test_import_gptstore_imports_no_heavy_library():
    assert (
        _heavy_after(
            "import gptstore, gptstore.manager, gptstore.catalog, gptstore.selection"
            ", gptstore.testing"
        )
        == "none"
    )


def test_help_imports_no_heavy_library():
    code = (
        "from gptstore.cli import cli\n"
        "try:\n    cli(['--help'], prog_name='gptstore')\nexcept SystemExit:\n    pass"
    )
    assert _heavy_after(code).splitlines()[-1] == "none"


def test_plugins_command_imports_no_heavy_library():
    code = (
        "from gptstore.cli import cli\n"
        "try:\n    cli(['plugins'], prog_name='gptstore')\nexcept SystemExit:\n    pass"
    )
    assert _heavy_after(code).splitlines()[-1] == "none"
