"""Shared fixtures: bundles exported once per session, the user package on the import path, and
CLI invocation helpers."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

TESTS = Path(__file__).parent
ROOT = TESTS.parent
ZOO = ["mlp", "cnn", "lstm", "encoder", "gpt", "seq2seq"]

# hypothesis keeps its example database and caches under the test cache, not in the working directory.
_CACHE = os.environ.get("TOOLKIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "toolkit"
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(_CACHE) / "hypothesis"))

# The user package (`userpkg.toy:FACTORY`) must import here and in subprocesses.
sys.path.insert(0, str(TESTS))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))


# What an exported bundle depends on: the exporter, the PyTorch side and the models. Exports take
# most of a warm run's time (torch.export), so bundles are kept between runs under the weights cache,
# keyed by these files' contents and the library versions; a change to any of them exports anew.
EXPORT_SOURCES = ("toolkit/compile/exporter.py", "toolkit/compile/export_worker.py", "toolkit/reference/*.py", "toolkit/bundle/*.py",
                  "toolkit/spec.py", "toolkit/errors.py", "toolkit/_onnx.py", "toolkit/_scoped.py", "toolkit/runtime/samples.py",
                  "toolkit/runtime/tokenizer.py", "models/*.py", "tests/userpkg/*.py")


def _export_digest(request: tuple) -> str:
    import onnx
    import onnxscript
    import torch

    digest = hashlib.sha256(repr((request, torch.__version__, onnx.__version__, onnxscript.__version__)).encode())
    for path in sorted(p for pattern in EXPORT_SOURCES for p in ROOT.glob(pattern)):
        digest.update(path.relative_to(ROOT).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:24]


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(model, preset="tiny", **options) → path of a bundle exported once per session (and
    reused across sessions while nothing it depends on changes, see EXPORT_SOURCES)."""
    from toolkit.compile.exporter import export
    from toolkit.reference.source import reference_models

    reference_models()
    from models.digits import cache_dir

    store = cache_dir().parent / "test-bundles"
    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("bundles")
    session_trust = tmp_path_factory.mktemp("trust-exported") / "trusted.json"

    def get(model: str, preset: str | None = "tiny", **options) -> Path:
        key = (model, preset, tuple(sorted(options.items())))
        if key not in cache:
            preset_arg = None if ":" in model else preset
            out = root / f"{re.sub(r'[^A-Za-z0-9_-]+', '-', model)[-40:]}-{preset}-{len(cache)}"
            kept = store / _export_digest(key)
            if kept.is_dir():
                shutil.copytree(kept, out)
            else:
                with _trust_file(session_trust):  # remembered for the session, not for the test that happened to ask first
                    export(model, out, preset=preset_arg, **options)
                store.mkdir(parents=True, exist_ok=True)
                staging = Path(tempfile.mkdtemp(dir=store.parent, prefix=".test-bundle-"))
                shutil.copytree(out, staging / "bundle")
                with contextlib.suppress(OSError):  # another worker kept the same bundle first
                    os.replace(staging / "bundle", kept)
                shutil.rmtree(staging, ignore_errors=True)
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

    def get(model: str, variants: tuple[str, ...], **options) -> Path:
        key = (model, variants, tuple(sorted(options.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp("variants") / model
            shutil.copytree(exported(model, **options), path)
            for variant in variants:
                if variant == "opt":
                    optimize(path)
                else:
                    quantize(path, mode=variant, **({} if variant == "fp16" else {"calibration_samples": 32}))
            cache[key] = path
        return cache[key]

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


@contextlib.contextmanager
def _trust_file(path: Path):
    before = os.environ.get("TOOLKIT_TRUST_FILE")
    os.environ["TOOLKIT_TRUST_FILE"] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOOLKIT_TRUST_FILE", None)
        else:
            os.environ["TOOLKIT_TRUST_FILE"] = before


@pytest.fixture(scope="session", autouse=True)
def trust_file_of_the_session(tmp_path_factory):
    """The bundles the session's fixtures make are trusted in a file of the session's, never the user's."""
    os.environ["TOOLKIT_TRUST_FILE"] = str(tmp_path_factory.mktemp("trust") / "trusted.json")


@pytest.fixture(autouse=True)
def trust_file(tmp_path_factory, monkeypatch):
    """Each test starts trusting nothing (toolkit.bundle.trust): what a fixture exported is remembered
    elsewhere, so a factory's bundle is refused until the test vouches for it."""
    path = tmp_path_factory.mktemp("trust") / "trusted.json"
    monkeypatch.setenv("TOOLKIT_TRUST_FILE", str(path))
    return path


@pytest.fixture(scope="session", autouse=True)
def nothing_lands_in_the_working_directory():
    """No stage may leave files where it was run from (onnxruntime's tools dump into the working
    directory unless they run somewhere else)."""
    before = set(Path.cwd().iterdir())
    yield
    stray = sorted(str(p) for p in set(Path.cwd().iterdir()) - before if p.name != ".pytest_cache")
    assert not stray, f"files left in the working directory: {stray}"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """`--dist loadgroup` sends an xdist_group's tests to one worker by suffixing their node ids with
    "@group"; pytest-xdist 3.8 sets `item._nodeid`, which pytest 9 no longer reads (the id is `_id`),
    so each group was silently split over the workers and its module fixture made on each. Done here
    where xdist's own suffix did not take."""
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import coerce_node_id  # pytest >= 9; before, xdist's own suffix works
    except ImportError:
        return
    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")})
        if groups and "@" not in item.nodeid:
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(groups)}")
