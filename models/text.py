"""A real English corpus that ships with Python — the standard library's docstrings, read with `ast`
(nothing is imported) — and brief, deterministic training of the reference gpt on its bytes, with
an on-disk cache (models/digits.py's `cache_dir`)."""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.digits import cached_training, load_trained, save_atomic, warmup_cosine
from toolkit._scoped import torch_threads
from toolkit.runtime.tokenizer import ByteTokenizer

TRAINING_RECIPE = "adamw-6e-3-cosine-batch32-window128-prose-v2"  # bump when the recipe changes: it keys the cache
_SKIP = {"test", "tests", "idlelib", "turtledemo", "tkinter", "lib2to3", "ensurepip", "pydoc_data", "site-packages"}
_VAL_EVERY = 20  # every 20th docstring is held out for the validation loss
WINDOW, BATCH = 128, 32
TRAINING_THREADS = 2


@lru_cache(maxsize=1)
def corpus() -> tuple[str, str]:
    """(train, validation) text: the prose of docstrings (at least 80 characters), in file order, split by docstring."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not set(p.relative_to(root).parts[:-1]) & _SKIP)
    docs = []
    for file in files:
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = _prose(ast.get_docstring(node) or "")
                if len(doc) >= 80:
                    docs.append(doc)
    train = [d for i, d in enumerate(docs) if i % _VAL_EVERY]
    val = [d for i, d in enumerate(docs) if not i % _VAL_EVERY]
    return "\n\n".join(train), "\n\n".join(val)


def _prose(doc: str) -> str:
    """The docstring's prose: indented lines (code, examples, tables) and doctest lines dropped."""
    lines = [ln for ln in doc.splitlines() if not ln.startswith((" ", "\t", ">>>", "..."))]
    return "\n".join(lines).strip()


def train_gpt(model: nn.Module, cfg: Any) -> tuple[nn.Module, dict[str, float]]:
    """Loads cached weights for `cfg`, or trains `model` for `cfg.train_steps` steps and caches them.
    Returns the model (eval mode) and {"val_loss", "train_loss"} in nats per byte."""
    train_text, val_text = corpus()
    text_digest = hashlib.sha256((train_text + val_text).encode()).hexdigest()
    path = cached_training("gpt", f"{cfg}|{TRAINING_RECIPE}|{text_digest}|torch={torch.__version__}")
    if (metrics := load_trained(model, path)) is not None:
        return model, metrics
    metrics = _train(model, cfg, cfg.train_steps, lr=6e-3)
    save_atomic({"state": model.state_dict(), "metrics": metrics}, path)
    return model, metrics


def fine_tune_gpt(model: nn.Module, cfg: Any, trained: dict[str, float]) -> dict[str, Any]:
    """A fifth of the training recipe's steps at a third of its learning rate (after pruning), with the
    validation loss of the unpruned model (`trained`, its training metrics) and of the pruned one before and after."""
    steps = max(cfg.train_steps // 5, 1)
    pruned = _loss(model.eval(), *_validation(cfg))
    tuned = _train(model, cfg, steps, lr=2e-3)["val_loss"]
    return {"steps": steps, "metric": "val_loss", "unpruned": trained["val_loss"], "pruned": pruned, "fine_tuned": tuned}


def _validation(cfg: Any) -> tuple[torch.Tensor, int]:
    return torch.tensor(ByteTokenizer().encode(corpus()[1]), dtype=torch.long), min(WINDOW, cfg.context)


def _train(model: nn.Module, cfg: Any, steps: int, *, lr: float) -> dict[str, float]:
    train = torch.tensor(ByteTokenizer().encode(corpus()[0]), dtype=torch.long)
    val, window = _validation(cfg)
    # A fixed thread count: the weights then depend on the key alone, not on the machine's cores.
    with torch_threads(TRAINING_THREADS):
        torch.manual_seed(0)
        order = torch.Generator().manual_seed(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        schedule = warmup_cosine(optimizer, steps, warmup=max(steps // 20, 1))
        model.train()
        losses = []
        for _ in range(steps):
            starts = torch.randint(0, len(train) - window - 1, (BATCH,), generator=order)
            batch = torch.stack([train[s : s + window + 1] for s in starts.tolist()])
            loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        model.eval()
        return {"val_loss": _loss(model, val, window), "train_loss": float(np.mean(losses[-20:]))}


def validation_windows(count: int, length: int) -> np.ndarray:
    """(count, length) byte ids: evenly spaced windows of the held-out docstrings."""
    val = np.frombuffer(corpus()[1].encode("utf-8"), dtype=np.uint8).astype(np.int64)
    starts = np.linspace(0, len(val) - length, count).astype(int)
    return np.stack([val[s : s + length] for s in starts])


@torch.no_grad()
def _loss(model: nn.Module, ids: torch.Tensor, window: int, windows: int = 64) -> float:
    """Mean next-byte cross-entropy over `windows` evenly spaced windows of the text."""
    starts = np.linspace(0, len(ids) - window - 1, windows).astype(int)
    batch = torch.stack([ids[s : s + window + 1] for s in starts])
    return float(F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()))
