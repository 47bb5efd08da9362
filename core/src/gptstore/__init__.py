"""gptstore: an open model store for language models.

Plugins import :data:`hookimpl` to mark their hook implementations::

    from gptstore import hookimpl

Importing gptstore never imports torch, transformers or onnxruntime.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

#: Marks a function as an implementation of a ``gptstore_*`` hook.
hookimpl = pluggy.HookimplMarker("gptstore")

__all__ = ["__version__", "hookimpl"]
