"""Process-wide settings changed for the length of a `with` block and then put back."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

__all__ = ["logger_level", "logging_disabled", "torch_threads"]


@contextlib.contextmanager
def logger_level(name: str | None, level: int) -> Iterator[None]:
    """The logger `name` (None: the root logger) at `level` inside the block."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextlib.contextmanager
def logging_disabled(level: int) -> Iterator[None]:
    """Every logger's records at `level` and below dropped inside the block, whatever handlers the
    code that logs has set up."""
    previous = logging.root.manager.disable
    logging.disable(level)
    try:
        yield
    finally:
        logging.disable(previous)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count (process-wide) at `count` inside the block."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
