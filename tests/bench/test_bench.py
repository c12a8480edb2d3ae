"""toolkit bench: interleaved measurement, the report's format, work counting, and bad input.
Timings themselves are never asserted (machines are shared and noisy)."""

import json
import math
import os

import numpy as np
import onnx
import pytest

from toolkit.bench.candidates import TORCH_EAGER, nodes_by_provider
from toolkit.bench.compare import available_providers, bench
from toolkit.bench.measure import measure
from toolkit.bench.report import ROW_FIELDS
from toolkit.bundle import Bundle
from toolkit.runtime.samples import make_feeds
from toolkit.runtime.session import cuda_status

QUICK = {"max_time": 0.02, "rounds": 2, "warmup": 1}


def test_measure_interleaves_rounds_and_rotates_the_order():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    ticks = iter(range(10_000))
    latencies, order = measure(steps, max_time=3.0, rounds=3, warmup=2, clock=lambda: next(ticks))

    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up, untimed
    assert order == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    timed = calls[6:]
    # every round visits every candidate; no candidate's runs all come before another's
    assert timed == [name for round_ in order for name in round_]
    assert all(len(latencies[name]) == 3 for name in steps)
    assert all((v > 0).all() for v in latencies.values())


def test_measure_runs_each_step_until_its_share_of_the_time_is_spent():
    now = [0.0]

    def clock():
        return now[0]

    def slow():
        now[0] += 0.125  # exact in binary floating point

    latencies, _ = measure({"slow": slow}, max_time=1.0, rounds=2, warmup=0, clock=clock)
    assert len(latencies["slow"]) == 8 and np.allclose(latencies["slow"], 0.125)


def test_warm_up_is_bounded_by_the_time_given_too():
    """--max-time bounds a slow model's warm-up as well as its timed rounds (at least one warm-up run)."""
    now, calls = [0.0], []

    def slow():
        calls.append(now[0])
        now[0] += 0.5

    measure({"slow": slow}, max_time=1.0, rounds=1, warmup=10, clock=lambda: now[0])
    assert len(calls) == 2 + 2  # warm-up: runs starting at 0 and 0.5; then the timed round's 1.0 s


@pytest.fixture(scope="module")
def report(exported):
    return bench(exported("encoder"), batches=(1, 2), seqs=(4,), **QUICK)


@pytest.mark.slow
def test_report_has_a_row_per_candidate_and_shape_with_torch_as_reference(report):
    variants = {(r.variant, r.batch, r.seq) for r in report.rows}
    assert variants == {(v, b, 4) for v in (TORCH_EAGER, "fp32") for b in (1, 2)}
    for row in report.rows:
        assert row.p50_ms <= row.p90_ms <= row.p99_ms
        assert row.items_per_s == pytest.approx(row.batch * 1000 / row.mean_ms)
        assert row.provider == "cpu" and row.cpu_nodes is None
        torch_row = next(r for r in report.rows if r.variant == TORCH_EAGER and r.batch == row.batch)
        assert row.speedup_vs_torch == pytest.approx(torch_row.p50_ms / row.p50_ms)
        assert row.gflops_per_s == pytest.approx(row.gflop * 1e3 / row.p50_ms)
        assert row.gemm_peak_gflops_per_s > 0 and row.peak_mem_mb >= 0
    assert report.schedule == [["cpu/torch-eager", "cpu/fp32"], ["cpu/fp32", "cpu/torch-eager"]]
    cpus = len(os.sched_getaffinity(0))  # the default thread count
    assert report.settings["threads"] == [cpus] and {r.threads for r in report.rows} == {cpus}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two thread counts need two CPUs to be measured")
@pytest.mark.slow
def test_thread_counts_are_an_axis_with_torch_at_each(cli, exported):
    import torch

    threads_before = torch.get_num_threads()
    result = cli("bench", exported("mlp"), "--batch", "1", "--threads", "2,1", "--max-time", "0.02", "--rounds", "2", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = report["rows"]
    assert report["settings"]["threads"] == [1, 2]
    assert {(r["variant"], r["threads"]) for r in rows} == {(v, n) for v in (TORCH_EAGER, "fp32") for n in (1, 2)}
    for row in rows:  # each row against torch eager at its own thread count
        torch_row = next(r for r in rows if r["variant"] == TORCH_EAGER and r["threads"] == row["threads"])
        assert row["speedup_vs_torch"] == pytest.approx(torch_row["p50_ms"] / row["p50_ms"])
    assert set(report["schedule"][0]) == {f"cpu/{v}@{n}t" for v in (TORCH_EAGER, "fp32") for n in (1, 2)}
    assert torch.get_num_threads() == threads_before  # process-wide in torch: put back
    header = next(line for line in result.stderr.splitlines() if "variant" in line)
    assert "threads" in header and "1, 2 threads" in result.stderr


def test_turns_are_entered_and_cooled_down_untimed():
    """torch's thread count is set by a step's `enter` before each of its turns; after each turn the
    threads it leaves spinning get `cooldown` seconds to stop. Neither is in the timing."""
    events = []
    now = [0.0]

    def step():
        events.append("run")
        now[0] += 1.0

    def sleep(seconds):
        events.append(f"sleep {seconds}")
        now[0] += 100.0  # would show in the latencies if it were timed

    step.enter = lambda: events.append("enter")
    latencies, _ = measure({"a": step}, max_time=2.0, rounds=2, warmup=1, cooldown=0.5, clock=lambda: now[0], sleep=sleep)
    assert events == ["enter", "run", "enter", "run", "sleep 0.5", "enter", "run", "sleep 0.5"]
    assert latencies["a"].tolist() == [1.0, 1.0]


def test_work_counted_from_the_graph_matches_the_architecture(exported):
    """The tiny MLP: a chain of dense layers, 2·batch·in·out FLOPs each."""
    path = exported("mlp")
    proto = onnx.load(str(Bundle.open(path).variant_path("fp32")))
    layers = [list(t.dims) for t in proto.graph.initializer if len(t.dims) == 2]
    expected = sum(2 * 3 * a * b for a, b in layers)
    row = next(r for r in bench(path, batches=(3,), torch_eager=False, **QUICK).rows)
    assert row.gflop * 1e9 == pytest.approx(expected)


def test_json_csv_and_plot_from_the_cli(cli, exported, tmp_path):
    result = cli("bench", exported("mlp"), "--batch", "1,4", "--max-time", "0.02", "--rounds", "2", "--json", "-",
                 "--csv", tmp_path / "rows.csv", "--plot", tmp_path / "plot.png")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    required = {"model", "provider", "variant", "batch", "p50_ms", "p90_ms", "p99_ms", "items_per_s", "speedup_vs_torch"}
    assert len(data["rows"]) == 4 and all(required <= set(row) for row in data["rows"])
    assert data["machine"]["gemm_peak_gflops_per_s"]["cpu"] > 0
    lines = (tmp_path / "rows.csv").read_text().splitlines()
    assert lines[0].split(",") == list(ROW_FIELDS) and len(lines) == 5
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_table_shows_speedup_and_parity(cli, exported):
    result = cli("bench", exported("mlp"), "--batch", "1", "--max-time", "0.02", "--rounds", "2")
    assert result.exit_code == 0, result.output
    assert "× torch" in result.stdout and "torch-eager" in result.stdout and "GEMM peak" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--providers", "tpu"], "unknown provider 'tpu'; available here: cpu"),
        (["--variants", "int4"], "has no variant 'int4'; its variants: fp32"),
        (["--batch", "1,x"], "--batch '1,x': expected comma-separated integers"),
        (["--batch", "0"], "batch sizes and sequence lengths must be at least 1"),
        (["--seq", "8"], "--seq applies to models with a 'seq' dim"),
        (["--threads", "0"], "thread counts [0]: this process may use"),
        (["--threads", "1,x"], "--threads '1,x': expected comma-separated integers"),
        (["--plot", "out.svg"], "give a .png file name"),
    ],
)
def test_bad_input_is_named(cli, exported, tmp_path, args, message):
    if "--plot" in args:
        args = ["--plot", str(tmp_path / "out.svg"), "--max-time", "0.01", "--rounds", "1"]
    result = cli("bench", exported("mlp"), *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr


@pytest.mark.skipif(cuda_status()[0], reason="CUDA is available here; the unavailable-provider message cannot be shown")
def test_cuda_where_there_is_none_lists_what_is_available(cli, exported):
    result = cli("bench", exported("mlp"), "--providers", "cuda")
    assert result.exit_code == 2
    assert "provider 'cuda' is not available here" in result.stderr and "available: cpu" in result.stderr


def test_a_path_that_is_not_a_bundle_is_refused(cli, tmp_path):
    result = cli("bench", tmp_path)
    assert result.exit_code == 2 and "is not a bundle directory" in result.stderr


def test_node_placement_is_read_from_the_profile(exported):
    bundle = Bundle.open(exported("mlp"))
    feeds = make_feeds(bundle.manifest.inputs, {"batch": 1}, seed=0)
    counts = nodes_by_provider(bundle.variant_path("fp32"), "cpu", feeds, threads=1)
    assert list(counts) == ["CPUExecutionProvider"] and counts["CPUExecutionProvider"] >= 3


@pytest.mark.skipif(not cuda_status()[0], reason=f"no CUDA provider here: {cuda_status()[1]}")
def test_cuda_rows_bind_io_on_the_device_and_count_cpu_nodes(exported):
    result = bench(exported("encoder"), providers=("cpu", "cuda"), batches=(1,), seqs=(4,), **QUICK)
    cuda_rows = [r for r in result.rows if r.provider == "cuda" and r.variant != TORCH_EAGER]
    assert cuda_rows and all(isinstance(r.cpu_nodes, int) for r in cuda_rows)
    assert all(math.isfinite(r.p50_ms) for r in result.rows)
    assert "cuda" in available_providers()


def test_a_factory_bundle_is_timed_with_torch_only_when_its_source_is_trusted(cli, exported):
    refused = cli("bench", exported("userpkg.toy:build"), "--batch", "1", "--max-time", "0.02", "--rounds", "2")
    assert refused.exit_code == 2 and "--trust-source" in refused.stderr and "--no-torch" in refused.stderr
    alone = cli("bench", exported("userpkg.toy:build"), "--batch", "1", "--max-time", "0.02", "--rounds", "2", "--no-torch")
    assert alone.exit_code == 0, alone.output


def test_the_sizes_of_other_dims_are_shown(cli, exported, tmp_path):
    """A dim that is neither batch nor seq (here `length`) is timed at a size the table must say."""
    result = cli("bench", exported("userpkg.toy:build"), "--batch", "1", "--max-time", "0.02", "--rounds", "2", "--csv", tmp_path / "rows.csv", "--trust-source")
    assert result.exit_code == 0, result.output
    assert "other dims" in result.stdout and "length 5" in result.stdout
    lines = (tmp_path / "rows.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert len(lines) == 3 and all(row.split(",")[header.index("dims")] == "length 5" for row in lines[1:])


@pytest.mark.slow  # exports or quantizes a model
def test_int8_rows_are_set_against_the_integer_gemm_peak(with_variants):
    """An int8 variant's throughput is compared with onnxruntime's integer MatMul on this machine, not
    with the fp32 one; its work (MatMulInteger) is counted as the fp32 graph's is."""
    report = bench(with_variants("mlp", ("int8",)), variants=["fp32", "int8"], batches=(4,), torch_eager=False, **QUICK)
    peaks = report.machine["gemm_peak_gflops_per_s"]
    assert peaks["cpu int8"] > 0 and peaks["cpu"] > 0
    rows = {r.variant: r for r in report.rows}
    assert rows["int8"].gemm_peak_gflops_per_s == pytest.approx(peaks["cpu int8"], rel=0.01)
    assert rows["fp32"].gemm_peak_gflops_per_s == pytest.approx(peaks["cpu"], rel=0.01)
    assert rows["int8"].gflop == pytest.approx(rows["fp32"].gflop)
