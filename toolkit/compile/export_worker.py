"""Runs one `toolkit.compile.exporter.trace` in a fresh interpreter and reports over stdout.

Protocol: each line this worker means for its parent starts with the tag; everything else on
stdout (a user's print, a library's chatter) is not part of the protocol.
"""

from __future__ import annotations

import json
import sys
import traceback

from toolkit.compile.exporter import _WORKER_TAG, trace
from toolkit.errors import ToolkitError


def _send(message: dict) -> None:
    print(_WORKER_TAG + json.dumps(message), flush=True)


def main() -> int:
    request = json.loads(sys.argv[1])
    try:
        _send({"result": trace(**request, progress=lambda text: _send({"progress": text}))})
        return 0
    except ToolkitError as exc:
        _send({"error": str(exc), "exit_code": exc.exit_code, "traceback": traceback.format_exc()})
        return exc.exit_code
    except Exception as exc:  # a bug or an unexpected library failure: say what, with the traceback
        _send({"error": f"export failed with {type(exc).__name__}: {exc}", "exit_code": 2, "traceback": traceback.format_exc()})
        return 2


if __name__ == "__main__":
    sys.exit(main())
