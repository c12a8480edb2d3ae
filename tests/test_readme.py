"""The README's commands are the product's front door: run them as written."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # the commands build and bench whole models

README = (ROOT / "README.md").read_text()


def _block_after(marker: str) -> str:
    match = re.search(re.escape(marker) + r"\s*```\w*\n(.*?)```", README, re.S)
    assert match, f"README has no code block after {marker}"
    return match.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    printed = subprocess.run([ROOT / ".ci" / "run", "--print"], capture_output=True, text=True, check=True).stdout.strip()
    assert printed == _block_after("<!-- test-command -->")
    assert "pytest" in printed and "torch==2.13.0" in printed


def test_main_command_runs_after_its_install_step(tmp_path):
    steps = _block_after("<!-- main-command -->").split(" && ")
    assert steps[:2] == ["python3 -m venv .venv", ". .venv/bin/activate"] and steps[2].startswith("pip install torch==2.13.0 -e ")
    job = " && ".join(steps[3:])  # this test already runs inside an installed environment
    env = {**os.environ, "COLUMNS": "200"}  # tables unwrapped, so cells can be matched
    result = subprocess.run(["bash", "-c", job], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "acc 9" in out and "pass" in out and "best:" in out  # build: gates, verdicts, the choice
    assert "predicted class per row" in out  # run --variant best
    assert "× torch" in out and "torch-eager" in out  # bench


def test_tour_commands_run(tmp_path):
    tour = re.search(r"```console\n(.*?)```", README, re.S).group(1)
    commands = [line[2:] for line in tour.splitlines() if line.startswith("$ ")]
    assert len(commands) >= 4
    for command in commands:
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0, f"{command}\n{result.stdout}{result.stderr}"


def test_the_own_model_example_exports_checks_and_builds_without_warnings(tmp_path):
    package = tmp_path / "my_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "my_module.py").write_text(_block_after("<!-- own-model -->"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "toolkit.cli", "build", "my_pkg.my_module:build", "-o", "bundle"], cwd=tmp_path,
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in (result.stdout + result.stderr).lower()
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["name"] == "my-classifier" and manifest["description"] == "bag-of-embeddings topic classifier"
    assert all(v["parity"]["passed"] for v in manifest["variants"].values() if v["precision"] != "int8")
    assert manifest["variants"]["fp32"]["parity"]["task_metric"]["inputs"] == "256 real inputs"
