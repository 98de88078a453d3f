"""``python -m vitcompress``: the CLI."""

from .entry import run

run()
