"""``python -m gptstore.cli``: the ``gptstore`` command."""

from gptstore.cli import main

main()
