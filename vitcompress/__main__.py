"""``python -m vitcompress``: the CLI."""

from .cli import run

run()
