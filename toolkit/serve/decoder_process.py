"""Large JSON request bodies decoded in a child process. `json.loads` (and turning its lists into
arrays) holds the GIL for the whole parse, about 30 ms per MiB here: in a thread it would still stall
the event loop, and health probes with it. The child is a plain Python subprocess (no
multiprocessing: that would re-run the embedding app's main module), started on first use and
again if it dies; requests go to it one at a time, as length-prefixed pickles over its pipes: the
child reads decode_request's arguments and writes ("ok", result), ("error", status, message) or
("failed", what broke).

One exchange holds the pipes from its write to its read, under a thread lock taken in the worker
thread itself: a request cancelled while its answer is being read (its client went away) leaves the
exchange to finish, and the next request starts only then, on a clean pipe. The child runs with
`-P` (Python 3.11+; on 3.10 the code drops sys.path[0] before its imports): the server's working
directory is not on its path, so a module planted there is never imported.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
import subprocess
import sys
import threading
from typing import IO, Any

from toolkit.serve.protocol import InferRequest, ProtocolError, decode_request

__all__ = ["DecoderProcess", "serve"]

_LENGTH = struct.Struct("<Q")
_CHILD = ("import sys; sys.path = [p for p in sys.path if p]; "
          "from toolkit.serve.decoder_process import serve; serve(sys.stdin.buffer, sys.stdout.buffer)")
_SAFE_PATH = ["-P"] if sys.version_info >= (3, 11) else []


class DecoderProcess:
    """`decode_request` in a child process, one request at a time."""

    def __init__(self) -> None:
        self._child: subprocess.Popen | None = None
        self._lock = threading.Lock()  # taken by the thread that exchanges, so cancelling the caller cannot release it

    async def decode(self, *args: Any) -> InferRequest:
        answer = await asyncio.get_running_loop().run_in_executor(None, self._exchange_locked, args)
        if answer[0] == "error":
            raise ProtocolError(answer[2], status=answer[1])
        if answer[0] == "failed":
            raise RuntimeError(f"the JSON decoder process failed: {answer[1]}")
        return answer[1]

    def _exchange_locked(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        with self._lock:
            return self._exchange(args)

    def _exchange(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        for attempt in (1, 2):  # a child that died (killed, out of memory) is started again once
            if self._child is None or self._child.poll() is not None:
                self._child = subprocess.Popen([sys.executable, *_SAFE_PATH, "-c", _CHILD],
                                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            try:
                _write(self._child.stdin, args)
                return _read(self._child.stdout)
            except (BrokenPipeError, EOFError, struct.error):
                self._child.kill()
                self._child = None
                if attempt == 2:
                    raise RuntimeError("the JSON decoder process died twice on this request") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._child is not None and self._child.poll() is None:
            self._child.stdin.close()
            try:
                self._child.wait(5)
            except subprocess.TimeoutExpired:
                self._child.kill()


def _write(stream: IO[bytes], value: Any) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def _read(stream: IO[bytes]) -> Any:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise EOFError("the decoder process closed its pipe")
    size = _LENGTH.unpack(head)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the decoder process closed its pipe")
    return pickle.loads(data)  # only ever from the child this process started


def serve(stdin: IO[bytes], stdout: IO[bytes]) -> None:
    """The child's loop: one decode per message, until the parent closes the pipe."""
    while True:
        try:
            args = _read(stdin)
        except EOFError:
            return
        try:
            answer: tuple[Any, ...] = ("ok", decode_request(*args))
        except ProtocolError as exc:
            answer = ("error", exc.status, str(exc))
        except Exception as exc:  # the parent logs it as an internal error
            answer = ("failed", f"{type(exc).__name__}: {exc}")
        _write(stdout, answer)

