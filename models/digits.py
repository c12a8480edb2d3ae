"""Handwritten digits (scikit-learn's copy of the UCI set, shipped inside the package, no download),
upsampled to 28×28, and deterministic training of the digit classifiers with an on-disk cache."""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from toolkit._scoped import torch_threads
from toolkit.spec import Dim, ModelSpec, TensorSpec

SIDE = 28
TRAINING_RECIPE = "adam-3e-3-batch32-v1"  # bump when the recipe below changes: it keys the cache


@lru_cache(maxsize=1)
def splits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test); x as float32 [N, 1, 28, 28] in [0, 1], y as int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    images = F.interpolate(images, size=(SIDE, SIDE), mode="bilinear", align_corners=False).numpy()
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target.astype(np.int64), test_size=0.2, random_state=0, stratify=digits.target
    )
    return x_train, y_train, x_test, y_test


def cache_dir() -> Path:
    root = os.environ.get("TOOLKIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "toolkit"
    return Path(root) / "weights"


def trained(module: nn.Module, key: str, *, epochs: int, flatten: bool) -> nn.Module:
    """Loads cached weights for `key`, or trains `module` on the digits and caches them.

    Training is single-threaded and seeded, so the weights depend only on the key, not on the
    machine's thread count (that keeps parity checks against a rebuilt reference meaningful).
    """
    digest = hashlib.sha256(f"{key}|{TRAINING_RECIPE}|epochs={epochs}|torch={torch.__version__}".encode()).hexdigest()
    path = cache_dir() / f"{key.split('|')[0]}-{digest[:16]}.pt"
    if path.is_file():
        module.load_state_dict(torch.load(path, weights_only=True))
        return module.eval()
    _fit(module, epochs=epochs, flatten=flatten, lr=3e-3)
    save_atomic(module.state_dict(), path)
    return module


def _fit(module: nn.Module, *, epochs: int, flatten: bool, lr: float) -> None:
    """The recipe: Adam, batches of 32 in a seeded order, one thread (the weights depend on the key alone)."""
    x_train, y_train, _, _ = splits()
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    if flatten:
        x = x.flatten(1)
    with torch_threads(1):
        torch.manual_seed(0)
        module.train()
        optimizer = torch.optim.Adam(module.parameters(), lr=lr)
        order = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=order).split(32):
                optimizer.zero_grad()
                F.cross_entropy(module(x[idx]), y[idx]).backward()
                optimizer.step()
    module.eval()


FINE_TUNE_EPOCHS = 5


def fine_tune(module: nn.Module, *, flatten: bool) -> dict[str, Any]:
    """A short run of the training recipe at a third of its learning rate (after pruning), with the
    test accuracy of the pruned model before and after it."""
    pruned = _test_accuracy(module, flatten)
    _fit(module, epochs=FINE_TUNE_EPOCHS, flatten=flatten, lr=1e-3)
    return {"epochs": FINE_TUNE_EPOCHS, "metric": "test_accuracy", "pruned": pruned, "fine_tuned": _test_accuracy(module, flatten)}


def _test_accuracy(module: nn.Module, flatten: bool) -> float:
    feeds, labels = eval_data("x", flatten=flatten)
    module.eval()
    with torch.inference_mode():
        predicted = module(torch.from_numpy(feeds["x"])).argmax(-1).numpy()
    return float((predicted == labels).mean())


def cached_training(family: str, key: str) -> Path:
    """Where the weights trained under `key` (config, recipe, data, torch version) are cached."""
    return cache_dir() / f"{family}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def load_trained(model: nn.Module, path: Path) -> dict[str, float] | None:
    """Loads `{"state", "metrics"}` saved at `path` into `model` (eval mode); its metrics, or None if absent."""
    if not path.is_file():
        return None
    saved = torch.load(path, weights_only=True)
    model.load_state_dict(saved["state"])
    model.eval()
    return saved["metrics"]


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `steps`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))


def save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: concurrent trainers write identical files


def save_directory_once(path: Path, write: Callable[[Path], None]) -> None:
    """`write(staging)` fills a fresh directory that then becomes `path`, unless another process
    (a parallel test worker) published it first: the two are the same, and the later one is dropped."""
    import shutil

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        write(staging)
        staging.rename(path)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def classifier_spec(module: nn.Module, config: Any, *, input_name: str, input_shape: tuple[int, ...], description: str) -> ModelSpec:
    """The spec of a digits classifier: trained (or cached) weights, batch-dynamic input, test set."""
    family = type(module).__name__.lower()
    flatten = len(input_shape) == 1
    trained(module, f"{family}|{config}", epochs=config.epochs, flatten=flatten)
    return ModelSpec(
        module=module,
        inputs=[TensorSpec(input_name, "float32", ("batch", *input_shape))],
        outputs=["logits"],
        dims=[Dim("batch", export=2, check=(1, 5))],
        task="classify",
        description=description,
        eval_data=partial(eval_data, input_name, flatten=flatten),
        calibration_data=partial(calibration_data, input_name, flatten=flatten),
        fine_tune=partial(fine_tune, module, flatten=flatten),
    )


def calibration_data(input_name: str, count: int, *, flatten: bool) -> dict[str, np.ndarray]:
    x_train = splits()[0][:count]  # from the training split: the test split stays held out
    return {input_name: x_train.reshape(len(x_train), -1) if flatten else x_train}


def eval_data(input_name: str, *, flatten: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
    _, _, x_test, y_test = splits()
    return {input_name: x_test.reshape(len(x_test), -1) if flatten else x_test}, y_test


