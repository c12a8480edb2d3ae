"""Shared fixtures: bundles exported once per session, the user package on the import path, and
CLI invocation helpers."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

TESTS = Path(__file__).parent
ROOT = TESTS.parent
ZOO = ["mlp", "cnn", "lstm", "encoder", "gpt", "seq2seq"]

# The user package (`userpkg.toy:FACTORY`) must import here and in subprocesses.
sys.path.insert(0, str(TESTS))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(model, preset="tiny", **options) → path of a bundle exported once per session."""
    from toolkit.compile.exporter import export

    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("bundles")

    def get(model: str, preset: str | None = "tiny", **options) -> Path:
        key = (model, preset, tuple(sorted(options.items())))
        if key not in cache:
            preset_arg = None if ":" in model else preset
            out = root / f"{model.replace(':', '-').replace('.', '-')}-{preset}-{len(cache)}"
            export(model, out, preset=preset_arg, **options)
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def with_variants(exported, tmp_path_factory):
    """with_variants(model, ("opt", "int8", ...)) → a copy of the tiny bundle with those variants
    added (`opt` by optimize, the others by quantize), built once per session; parity not checked."""
    from toolkit.compile.optimizer import optimize
    from toolkit.compile.quantization import quantize

    cache: dict[tuple, Path] = {}

    def get(model: str, variants: tuple[str, ...]) -> Path:
        if (model, variants) not in cache:
            path = tmp_path_factory.mktemp("variants") / model
            shutil.copytree(exported(model), path)
            for variant in variants:
                if variant == "opt":
                    optimize(path)
                else:
                    quantize(path, mode=variant, **({} if variant == "fp16" else {"calibration_samples": 32}))
            cache[model, variants] = path
        return cache[model, variants]

    return get


@pytest.fixture
def copy_of(tmp_path):
    """copy_of(bundle) → a private copy a test may modify."""

    def copy(path: Path) -> Path:
        target = tmp_path / path.name
        shutil.copytree(path, target)
        return target

    return copy


@pytest.fixture
def cli():
    """cli(*args) → click Result of the toolkit CLI run in-process."""
    from toolkit.cli.commands import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})

    return invoke
