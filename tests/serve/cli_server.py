"""`toolkit serve` in a subprocess, for the tests that need the real command line and its signals."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


@contextmanager
def cli_server(args: Sequence[Any], ready: str) -> Iterator[tuple[subprocess.Popen, str, list[str]]]:
    """`toolkit serve ARGS`, yielding (process, URL, its stderr lines, still growing) once a line of
    its stderr matches `ready` (group 1: the URL); killed on the way out."""
    server = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "serve", *map(str, args)], stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    try:
        for line in server.stderr:
            log.append(line)
            if started := re.search(ready, line):
                break
        assert started, "".join(log)
        # keep reading: a server whose stderr pipe fills up (its access log) blocks on the next line
        server.stderr_reader = threading.Thread(target=lambda: log.extend(server.stderr), daemon=True)
        server.stderr_reader.start()
        yield server, started.group(1), log
    finally:
        server.kill()
