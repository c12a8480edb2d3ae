"""Timing: candidates' steps in interleaved rounds whose order rotates, every iteration timed on its
own; and the GEMM peak of this machine as onnxruntime achieves it, measured the same way."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from toolkit.runtime.session import new_session

__all__ = ["COOLDOWN_S", "GEMM_SIZES", "Step", "gemm_peak", "measure", "ort_step", "ort_session"]

# Idle time between two candidates' turns (at most one turn's length, so that quick runs stay quick).
# After a run, onnxruntime's pool threads spin for tens of milliseconds waiting for more work (torch's
# OpenMP threads for a few): without a pause they keep a core from the next candidate.
COOLDOWN_S = 0.1
Step = Callable[[], None]


def measure(
    steps: Mapping[str, Step], *, max_time: float, rounds: int, warmup: int, cooldown: float = 0.0,
    clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep,
) -> tuple[dict[str, np.ndarray], list[list[str]]]:
    """Times every step in interleaved rounds; returns (latencies in seconds per step, the order the
    steps ran in per round).

    Each step is warmed up `warmup` times, or as many of them as start within `max_time` (at least
    once: the first run of a session pays for its allocations), then each round gives each
    step about max_time / (rounds × steps) seconds (at least one iteration), starting with a
    different step every round. A step's `enter` attribute, where it has one, is called untimed before each of its
    turns, and `cooldown` seconds pass idle after each turn.
    """
    labels = list(steps)
    for label in labels:
        _enter(steps[label])
        deadline = clock() + max_time
        for done in range(warmup):
            if done and clock() >= deadline:
                break
            steps[label]()
    budget = max_time / (rounds * len(labels))
    samples: dict[str, list[float]] = {label: [] for label in labels}
    order: list[list[str]] = []
    for r in range(rounds):
        this_round = labels[r % len(labels):] + labels[: r % len(labels)]
        order.append(this_round)
        for label in this_round:
            step = steps[label]
            _enter(step)
            deadline = clock() + budget
            while True:
                start = clock()
                step()
                end = clock()
                samples[label].append(end - start)
                if end >= deadline:
                    break
            sleep(cooldown)
    return {label: np.asarray(s) for label, s in samples.items()}, order


def _enter(step: Step) -> None:
    enter = getattr(step, "enter", None)
    if enter is not None:
        enter()


GEMM_SIZES = {"cpu": (256, 512, 1024), "cuda": (1024, 2048, 4096)}  # a GPU needs larger products to fill


def gemm_peak(provider: str, *, threads: int, sizes: Sequence[int] | None = None, seconds: float = 0.3,
              dtype: str = "float32") -> float:
    """GFLOP/s of onnxruntime's MatMul of square `dtype` matrices on `provider`, the best over `sizes`:
    what this runtime achieves on this machine, the practical limit the model rows are compared with.
    `dtype` "int8": MatMulInteger of uint8 by int8 (the products of dynamic int8), in GOP/s."""
    return max(_gemm(provider, threads, size, seconds, dtype) for size in sizes or GEMM_SIZES[provider])


def _gemm(provider: str, threads: int, size: int, seconds: float, dtype: str) -> float:
    from onnx import helper

    from toolkit._onnx import IR_VERSION_CAP

    rng = np.random.default_rng(0)
    if dtype == "int8":
        types = {"a": np.uint8, "b": np.int8}
        node, result = helper.make_node("MatMulInteger", ["a", "b"], ["y"]), np.int32
        feeds = {n: rng.integers(0, 127, size=(size, size)).astype(t) for n, t in types.items()}
    else:
        types = {"a": np.dtype(dtype), "b": np.dtype(dtype)}
        node, result = helper.make_node("MatMul", ["a", "b"], ["y"]), np.dtype(dtype)
        feeds = {n: rng.standard_normal((size, size)).astype(dtype) for n in ("a", "b")}
    graph = helper.make_graph(
        [node], "gemm",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.dtype(t)), [size, size]) for n, t in types.items()],
        [helper.make_tensor_value_info("y", helper.np_dtype_to_tensor_dtype(np.dtype(result)), [size, size])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = IR_VERSION_CAP
    session = ort_session(proto.SerializeToString(), provider, threads)
    step = ort_step(session, feeds, provider)
    latencies, _ = measure({"gemm": step}, max_time=seconds, rounds=1, warmup=3)
    return 2 * size**3 / float(np.median(latencies["gemm"])) / 1e9


def ort_step(session: Any, feeds: dict[str, np.ndarray], provider: str, graph_id: int | None = None) -> Step:
    """One timed call of `session`. On CUDA, inputs are copied to the GPU once and outputs stay there:
    the timing holds no host-device copies; with `graph_id` (a session opened for CUDA graphs) the
    outputs are preallocated too, so the call is captured once and replayed."""
    if provider != "cuda":
        return lambda: session.run(None, feeds)
    import onnxruntime as ort

    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    options = None
    if graph_id is None:
        for output in session.get_outputs():
            binding.bind_output(output.name, "cuda", 0)
    else:
        for output in session.get_outputs():  # an ordinary run first, for the output shapes
            binding.bind_output(output.name, "cuda", 0)
        session.run_with_iobinding(binding, _graph_options(-1))
        first = binding.copy_outputs_to_cpu()
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        for output, value in zip(session.get_outputs(), first, strict=True):
            binding.bind_ortvalue_output(output.name, ort.OrtValue.ortvalue_from_shape_and_type(value.shape, value.dtype, "cuda", 0))
        options = _graph_options(graph_id)

    def step() -> None:
        session.run_with_iobinding(binding, options)
        binding.synchronize_outputs()

    return step


def _graph_options(graph_id: int) -> Any:
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options


def ort_session(model: bytes | str, provider: str, threads: int, profile: bool = False) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 4
    options.enable_profiling = profile
    return new_session(model, provider, options)
