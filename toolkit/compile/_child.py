"""Graph tools run in a child process that works in a directory of ours: onnxruntime's quantization
pre-processing and transformer optimizer dump the state of a failed symbolic shape inference
(`sym_shape_infer_temp.onnx` and its weights) into the working directory, and changing this
process's would not be thread-safe; rewrites that hold a model several times over leave their freed
memory fragmented in the process that ran them, for the rest of a build."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["ChildFailed", "run_child"]

_RUNNER = """
import json, sys, traceback
request = json.loads(sys.argv[1])
namespace = {}
exec(request["code"], namespace)
try:
    result = namespace["main"](*request["args"])
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__ + ": " + str(exc)[:500]}))
    sys.exit(1)
print(json.dumps({"result": result}))
"""


class ChildFailed(Exception):
    """The child's `main` raised: the exception's type and message."""


def run_child(code: str, *args: Any, cwd: Path) -> Any:
    """Runs `main(*args)` from the module source `code` in a fresh interpreter working in `cwd`;
    returns what it returned (JSON-serialisable), or raises ChildFailed with its error."""
    request = json.dumps({"code": code, "args": list(args)})
    result = subprocess.run([sys.executable, "-c", _RUNNER, request], cwd=cwd, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    reply = json.loads(lines[-1]) if lines else {"error": (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]}
    if "error" in reply:
        raise ChildFailed(reply["error"])
    return reply["result"]
