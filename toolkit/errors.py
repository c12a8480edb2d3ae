"""The package's one exception type; the CLI maps it to a message and an exit code."""

from __future__ import annotations

__all__ = ["ToolkitError", "CheckFailed", "EXIT_CHECK_FAILED", "EXIT_USAGE"]

EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2


class ToolkitError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""

    exit_code = EXIT_USAGE


class CheckFailed(ToolkitError):
    """A check (parity, validation of a produced artifact) did not pass."""

    exit_code = EXIT_CHECK_FAILED
