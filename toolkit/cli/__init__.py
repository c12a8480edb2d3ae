"""The `toolkit` command line: thin Typer commands over the library (app) and their tables (render)."""

from toolkit.cli.commands import app, main

__all__ = ["app", "main"]
