"""The CLI: a thin layer whose exit codes are 0 success, 1 a failed check, 2 bad usage or input."""

import json
import subprocess

import numpy as np
import pytest

from tests.compile.test_check import _add_wrong_variant


def test_models_lists_families_and_presets(cli):
    result = cli("models")
    assert result.exit_code == 0
    for name in ("mlp", "cnn", "lstm", "encoder", "gpt", "seq2seq", "tiny", "package.module:factory"):
        assert name in result.stdout


@pytest.mark.slow
def test_export_check_inspect_run_round_trip(cli, tmp_path):
    out = tmp_path / "mlp"
    result = cli("export", "mlp", "--preset", "tiny", "-o", out)
    assert result.exit_code == 0, result.output
    assert f"exported mlp to {out}" in result.stdout
    assert "exporting with the dynamo exporter" in result.stderr  # progress goes to stderr

    result = cli("check", out, "--json", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    assert "fp32" in result.stdout and "accuracy" in result.stdout and "pass" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] and report["variants"]["fp32"]["passed"]

    result = cli("inspect", out)
    assert result.exit_code == 0
    for text in ("mlp (classify)", "[batch, 784]", "variant fp32", "Gemm", "parity: passed", "integrity: ok"):
        assert text in result.stdout, text
    info = json.loads(cli("inspect", out, "--json").stdout)
    assert info["variants"]["fp32"]["ops"]["Gemm"] == 3 and info["providers"]["cpu"] == "available"

    result = cli("run", out, "--example", "--provider", "cpu")
    assert result.exit_code == 0 and "output logits: float32 [1, 10]" in result.stdout
    assert "predicted class per row" in result.stdout and "on cpu" in result.stderr


@pytest.mark.slow
def test_check_json_to_stdout(cli, exported, copy_of):
    result = cli("check", copy_of(exported("lstm")), "--json", "-")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["variants"]["fp32"]["outputs"]["score"]["passed"]


def test_run_reads_and_saves_npy_files(cli, exported, tmp_path):
    path = exported("encoder")
    ids = np.array([[3, 4, 5]], np.int64)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "mask.npy", np.ones_like(ids))
    result = cli("run", path, "-i", f"input_ids={tmp_path / 'ids.npy'}", "-i", f"attention_mask={tmp_path / 'mask.npy'}", "--save", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "out" / "logits.npy").shape == (1, 2)


def test_run_single_input_takes_a_bare_file(cli, exported, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 784), np.float32))
    result = cli("run", exported("mlp"), "-i", tmp_path / "x.npy")
    assert result.exit_code == 0 and "output logits: float32 [2, 10]" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "resnet", "-o", "{tmp}/b"], "error: unknown model 'resnet'; known: mlp, cnn, lstm, encoder, gpt"),
        pytest.param(["export", "userpkg.toy:unexportable", "-o", "{tmp}/b"], "operator: userpkg::mystery has no ONNX translation",
                     marks=pytest.mark.slow),
        (["export", "mlp", "--preset", "huge", "-o", "{tmp}/b"], "error: model 'mlp' has no preset 'huge'; presets: default, tiny"),
        (["check", "{tmp}/none"], "error: {tmp}/none is not a bundle: it does not exist."),
        (["check", "{mlp}", "--variant", "int8"], "has no variant 'int8'; its variants: fp32"),
        (["run", "{mlp}"], "give the inputs with --input NAME=FILE.npy, or pass --example"),
        (["run", "{mlp}", "-i", "x={tmp}/missing.npy"], "error: --input x: file {tmp}/missing.npy does not exist."),
        (["run", "{mlp}", "-i", "x={tmp}/text.npy"], "error: --input x: {tmp}/text.npy is not a readable .npy file"),
        (["run", "{mlp}", "-i", "x={tmp}/f64.npy"], "error: input 'x': expected dtype float32, got float64 (convert with .astype(np.float32))."),
        (["run", "{mlp}", "-i", "y={tmp}/f64.npy"], "error: unknown input 'y'; mlp takes x (float32 [batch, 784])."),
        (["run", "{mlp}", "--example", "--provider", "tpu"], "'tpu' is not one of 'auto', 'cpu', 'cuda'."),
        (["export", "mlp"], "Missing option '-o' / '--out'."),
        (["serve"], "error: give the bundles to serve (DIR...), or a --repository to load them from."),
        (["serve", "--repository", "{tmp}/nowhere"], "error: --repository {tmp}/nowhere is not a directory."),
        (["verify", "{mlp}", "--pub", "{tmp}/missing.pub"], "--pub {tmp}/missing.pub: no such file."),
    ],
)
def test_bad_input_exits_2_with_a_message(cli, exported, tmp_path, args, message):
    (tmp_path / "text.npy").write_text("not numpy")
    np.save(tmp_path / "f64.npy", np.zeros((1, 784)))
    fill = {"tmp": tmp_path, "mlp": exported("mlp")}
    result = cli(*[a.format(**fill) for a in args])
    assert result.exit_code == 2, result.output
    assert message.format(**fill) in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_failed_check_exits_1_and_names_the_variant(cli, exported, copy_of):
    path = copy_of(exported("cnn"))
    _add_wrong_variant(path, scale=1.5)
    result = cli("check", path)
    assert result.exit_code == 1
    rows = {tuple(c.strip() for c in ln.split("│")[1:3]): ln for ln in result.stdout.splitlines() if ln.startswith("│ ")}
    assert "FAIL" in rows[("wrong", "output logits")] and "pass" in rows[("fp32", "output logits")]
    assert "pass" in rows[("wrong", "accuracy")]  # argmax survives this error: element parity catches it


@pytest.mark.parametrize("command", [["check"], ["serve"], ["package", "--triton", "repo"]])
def test_debug_shows_the_traceback_for_every_command(cli, tmp_path, command):
    result = cli("--debug", command[0], tmp_path / "none", *command[1:])
    assert result.exit_code == 2 and "Traceback" in result.output and "is not a bundle" in result.output
    plain = cli(command[0], tmp_path / "none", *command[1:])
    assert plain.exit_code == 2 and "Traceback" not in plain.output


@pytest.mark.slow
def test_console_script_exit_codes(exported, copy_of, tmp_path):
    ok = subprocess.run(["toolkit", "check", copy_of(exported("mlp"))], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(["toolkit", "run", tmp_path / "none", "--example"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    assert subprocess.run(["toolkit", "--version"], capture_output=True, text=True).stdout.startswith("toolkit ")


@pytest.mark.parametrize("command", ["models", "export", "check", "inspect", "run"])
def test_every_command_explains_itself(cli, command):
    result = cli(command, "--help")
    assert result.exit_code == 0 and len(result.stdout) > 200


def test_no_help_text_is_eaten_as_console_markup():
    """rich reads "[default: 128]" in a help string as a markup tag and prints nothing of it."""
    import typer.main

    from toolkit.cli.commands import app

    group = typer.main.get_group(app)
    for name, command in group.commands.items():
        for param in command.params:
            text = getattr(param, "help", None) or ""
            assert "[" not in text.replace("[/", ""), f"toolkit {name} {param.name}: {text!r}"


def test_serve_without_the_serve_extra_says_how_to_install_it_before_anything_else(cli, exported, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else find_spec(name, *a))
    result = cli("serve", exported("mlp"))
    assert result.exit_code == 2
    assert "toolkit serve needs the serve extra (uvicorn missing): pip install 'toolkit[serve]'." in result.stderr
    assert "serving" not in result.output


@pytest.mark.slow  # builds or exports a model
def test_check_drops_the_model_librarys_info_logging_as_export_does(cli, exported):
    result = cli("check", exported("userpkg.toy:chatty"), "--trust-source")
    assert result.exit_code == 0, result.output
    assert "chatty: loading weights" not in result.output


@pytest.mark.slow  # exports or quantizes a model
def test_a_piped_bench_prints_its_table_whole(exported):
    """Outside a terminal (a pipe, a log file) the table is not cut to 80 columns."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    result = subprocess.run([sys.executable, "-m", "toolkit.cli", "bench", exported("mlp"), "--batch", "1", "--max-time", "0.02",
                             "--rounds", "2"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    assert "GFLOP/s (% peak)" in result.stdout and "torch-eager" in result.stdout and "reference" in result.stdout


@pytest.mark.slow  # exports or quantizes a model
def test_debug_shows_torchs_own_account_of_a_dynamo_failure_it_fell_back_from(cli, tmp_path, capfd):
    result = cli("--debug", "export", "userpkg.failing:branching", "-o", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert "DataDependentOutputException" in capfd.readouterr().err  # the worker's traceback, on stderr
