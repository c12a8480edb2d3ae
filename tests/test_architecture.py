"""The package's import contracts (pyproject.toml, [tool.importlinter]; README, "Architecture"): the
runtime, serve and bundle never import torch or the compile side, and each layer imports only the
layers below it."""

import shutil
import subprocess
import sys

from tests.conftest import ROOT


def _lint(root) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
                           "--no-cache", "--no-logo"], cwd=root, env={"PYTHONPATH": str(root), "PATH": ""}, capture_output=True, text=True)


def test_import_contracts_hold():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_a_runtime_module_importing_the_compile_side_breaks_the_contracts(tmp_path):
    shutil.copytree(ROOT / "toolkit", tmp_path / "toolkit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    model = tmp_path / "toolkit" / "runtime" / "model.py"
    model.write_text(model.read_text() + "\n\ndef _planted():\n    from toolkit.compile.parity import check  # noqa: F401\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "toolkit.runtime.model -> toolkit.compile.parity" in result.stdout
    assert "2 broken" in result.stdout
