"""CUDA graphs: a CUDA session opened with `cuda_graph=True` captures a run whose inputs and outputs
are bound (IO binding) to fixed device buffers, and replays it for later runs with the same
bindings, one launch for the whole graph instead of one per kernel. Each capture has its own graph
id; a run with id -1 is an ordinary run.

On the CPU provider the same runners work with host buffers and nothing is captured, so the logic
around the buffers is exercised wherever the tests run.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.runtime.model import Model
from toolkit.runtime.session import ort_message

__all__ = ["CapturedRunner", "GraphIds", "device_of", "run_options", "run_uncaptured"]


def device_of(model: Model) -> str:
    return "cuda" if model.provider == "cuda" else "cpu"


def run_options(model: Model, graph_id: int) -> Any:
    """Run options that select graph `graph_id` (-1: an ordinary, uncaptured run) where the session
    captures graphs; plain run options elsewhere."""
    import onnxruntime as ort

    options = ort.RunOptions()
    if model.cuda_graph:
        options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options


class GraphIds:
    """Graph ids of one session, handed out once each (thread-safe)."""

    def __init__(self) -> None:
        self._next = itertools.count(1)
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            return next(self._next)


class _Captured:
    """One input signature's device buffers, bound once, and the graph id that replays them."""

    def __init__(self, model: Model, graph_id: int, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]):
        import onnxruntime as ort

        device = device_of(model)
        self.inputs = {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), device, 0) for n, a in feeds.items()}
        self.outputs = {n: ort.OrtValue.ortvalue_from_shape_and_type(a.shape, a.dtype, device, 0) for n, a in outputs.items()}
        self.binding = model.session.io_binding()
        for name, value in self.inputs.items():
            self.binding.bind_ortvalue_input(name, value)
        for name, value in self.outputs.items():
            self.binding.bind_ortvalue_output(name, value)
        self.options = run_options(model, graph_id)
        self.lock = threading.Lock()

    def run(self, session: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.lock:  # the buffers are shared: one call at a time per signature
            for name, value in feeds.items():
                self.inputs[name].update_inplace(np.ascontiguousarray(value))
            session.run_with_iobinding(self.binding, self.options)
            return {name: value.numpy() for name, value in self.outputs.items()}


class CapturedRunner:
    """Runs a model's calls through captured graphs: each distinct set of input shapes gets device
    buffers and a graph of its own on first use, up to `limit` of them; later calls with those shapes
    copy their inputs in, replay, and copy the outputs out. Shapes beyond the limit run uncaptured.
    Feeds must already be valid (`Model.validate`), as for `Model.run_validated`."""

    def __init__(self, model: Model, *, limit: int = 8):
        if limit < 1:
            raise ToolkitError(f"the graph limit must be at least 1, got {limit}.")
        self.model, self.limit = model, limit
        self._graphs: dict[tuple, _Captured] = {}
        self._ids = GraphIds()
        self._lock = threading.Lock()

    @property
    def captured(self) -> int:
        """Input signatures with a graph of their own."""
        return len(self._graphs)

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        key = tuple((t.name, feeds[t.name].shape) for t in self.model.inputs)
        with self._lock:
            graph = self._graphs.get(key)
            if graph is None and len(self._graphs) < self.limit:
                first = self._uncaptured(feeds)  # the output shapes of this signature, and a result
                self._graphs[key] = _Captured(self.model, self._ids.take(), feeds, first)
                return _select(first, outputs)
        if graph is None:
            return _select(self._uncaptured(feeds), outputs)
        try:
            return _select(graph.run(self.model.session, feeds), outputs)
        except Exception as exc:  # onnxruntime's own exception types are not importable portably
            raise ToolkitError(f"onnxruntime failed replaying {self.model.name} ({self.model.variant}): {ort_message(exc)}") from exc

    def _uncaptured(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_uncaptured(self.model, feeds)


def run_uncaptured(model: Model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An ordinary run (graph id -1) through IO binding, which a session opened for CUDA graphs takes
    like any other; host arrays in and out."""
    session = model.session
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    names = [o.name for o in model.outputs]
    for name in names:
        binding.bind_output(name, "cpu")
    try:
        session.run_with_iobinding(binding, run_options(model, -1))
    except Exception as exc:  # onnxruntime's own exception types are not importable portably
        raise ToolkitError(f"onnxruntime failed running {model.name} ({model.variant}): {ort_message(exc)}") from exc
    return dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))


def _select(results: dict[str, np.ndarray], outputs: Sequence[str] | None) -> dict[str, np.ndarray]:
    return results if outputs is None else {name: results[name] for name in outputs}
