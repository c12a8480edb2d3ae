"""What the quantization handlers share: the context they run in, pre-processing, calibration feeds
and the per-op report of what got quantized."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit._onnx import is_large
from toolkit.bundle import Bundle
from toolkit.compile._child import ChildFailed, run_child
from toolkit.errors import ToolkitError
from toolkit.runtime.samples import make_feeds
from toolkit.spec import ModelSpec

__all__ = ["QuantizeContext", "calibration_feeds", "op_report", "preprocess", "reduced_range", "saturating_cpu", "smooth_outliers"]

_WEIGHTED_OPS = ("MatMul", "Gemm", "LSTM", "Conv", "Attention")


@dataclass
class QuantizeContext:
    """A quantization's bundle, a private working directory, progress, and the PyTorch reference
    (built on first use, once, unless the caller already has it)."""

    bundle: Bundle
    workdir: Path
    say: Callable[[str], None]
    _reference: ModelSpec | None = field(default=None, repr=False)
    scratch: Path | None = None  # kept between the quantizations of one build: pre-processed models

    @property
    def reference(self) -> ModelSpec:
        if self._reference is None:
            from toolkit.reference.source import bundle_reference

            self._reference = bundle_reference(self.bundle)
        return self._reference


def preprocess(context: QuantizeContext, model_file: Path) -> tuple[Path, dict[str, Any]]:
    """onnxruntime's quant_pre_process (shape inference, constant folding), so that every weight is
    an initializer the quantizer can see, and exact GELUs as one op (passes/erf_gelu.py); in a
    child process (toolkit.compile._child), shapes inferred without the weights. Within a
    build (`context.scratch`) a file is pre-processed once, for every quantization made from it."""
    import json

    stat = model_file.stat()  # a variant's file is replaced, never rewritten in place: a new inode
    directory = context.scratch / f"pre-{stat.st_ino}-{stat.st_size}-{stat.st_mtime_ns}" if context.scratch else context.workdir
    target, record = directory / "pre.onnx", directory / "pre.json"
    if record.is_file():
        return target, json.loads(record.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    context.say("pre-processing (shape inference, constant folding) so every weight is visible to the quantizer")
    try:
        gelus = run_child(_PRE_PROCESS, str(model_file.resolve()), str(target.resolve()), False, is_large(model_file), cwd=directory)
        options = {"preprocess": "quant_pre_process"}
    except ChildFailed as reason:  # symbolic shape inference fails on some decoders: skip that part only
        try:
            gelus = run_child(_PRE_PROCESS, str(model_file.resolve()), str(target.resolve()), True, is_large(model_file), cwd=directory)
        except ChildFailed as exc:
            raise ToolkitError(f"onnxruntime's quantization pre-processing failed on {model_file}: {exc}") from exc
        why = " ".join(str(reason).split())[:200]
        options = {"preprocess": f"quant_pre_process without symbolic shape inference, which failed: {why}"}
    if gelus:
        options["gelu_fused"] = gelus
    record.write_text(json.dumps(options))
    return target, options


_PRE_PROCESS = """
import contextlib, io, os, tempfile

def main(model_file, target, skip_symbolic_shape, external):
    import onnx
    import onnxruntime
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata

    from toolkit._onnx import save_model, without_weights
    from toolkit.compile.passes._graph import record_inferred_shapes

    # onnxruntime's quant_pre_process, step by step, with both shape inferences run on the graph
    # without its weights: its own hold the model several times over (6× its size at the peak)
    model = onnx.load(model_file)
    if not skip_symbolic_shape:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        with contextlib.redirect_stdout(io.StringIO()):  # it prints its shape-inference failures
            inferred = SymbolicShapeInference.infer_shapes(without_weights(model))
        for field in ("value_info", "output"):
            del getattr(model.graph, field)[:]
            getattr(model.graph, field).extend(getattr(inferred.graph, field))
        del inferred
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as scratch:
        shaped, optimized = os.path.join(scratch, "shaped.onnx"), os.path.join(scratch, "optimized.onnx")
        save_model(model, shaped, external=external)
        del model
        options = onnxruntime.SessionOptions()
        options.optimized_model_filepath = optimized  # constant folding: every weight an initializer
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if external:
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        onnxruntime.InferenceSession(shaped, options, providers=["CPUExecutionProvider"])
        proto = record_inferred_shapes(onnx.load(optimized))
    add_pre_process_metadata(proto)
    # Shapes recorded for weights (the dynamo exporter writes them) go stale when the quantizer
    # transposes a Gemm's weight into a MatMul's under the same name, and its shape inference then
    # fails on them: a weight's shape is its own, so they go.
    weights = {t.name for t in proto.graph.initializer}
    kept = [v for v in proto.graph.value_info if v.name not in weights]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    # the exact GELU as one op: the quantizers leave it float either way, and five passes over a
    # feed-forward's widest tensor cost more than its int8 products save at batch 32
    gelus = 0
    if not external:
        from toolkit.compile.passes._graph import prune
        from toolkit.compile.passes.erf_gelu import fuse_erf_gelu

        gelus = fuse_erf_gelu(proto)
        if gelus:
            prune(proto.graph)
    save_model(proto, target, external=external)
    return gelus
"""


def calibration_feeds(context: QuantizeContext, samples: int) -> tuple[list[dict[str, np.ndarray]], str]:
    """The model's own calibration data when it has some, else sample inputs at the export sizes."""
    spec = context.reference
    if spec.calibration_data is not None:
        data = spec.calibration_data(samples)
        count = len(next(iter(data.values())))
        return [{k: v[i : i + 1] for k, v in data.items()} for i in range(count)], "the model's calibration set"
    manifest = context.bundle.manifest
    sizes = {d.name: 1 if d.name == "batch" else d.export for d in manifest.dims}
    return [make_feeds(manifest.inputs, sizes, seed=10_000 + i) for i in range(samples)], "sample inputs (no calibration set)"


def smooth_outliers(context: QuantizeContext, pre: Path, config: Any, *, dynamic: bool, reduce_range: bool) -> tuple[Path, list[dict[str, Any]]]:
    """(the model to quantize, what was smoothed): `pre` with its activation outliers moved into the
    weights where that lowers the int8 error on calibration data (toolkit.compile.quantization.smoothing)."""
    from toolkit.compile.quantization.smoothing import smoothed

    feeds, origin = calibration_feeds(context, config.calibration_samples)
    context.say(f"smoothing activation outliers into the weights where it lowers the int8 error on {len(feeds)} samples from {origin}")
    made = smoothed(pre, feeds, dynamic=dynamic, reduce_range=reduce_range)
    if made is None:
        context.say("not smoothing: the model is past protobuf's 2 GiB, a size smoothing has not been tried at")
        return pre, []
    target, records = made
    if records:
        folded = sum(r["into"] != "Mul" for r in records)
        context.say(f"smoothed {len(records)} activations: {folded} into the layer norm that makes them, {len(records) - folded} by a Mul")
    return target, records


def op_report(before: Path, after: Path) -> dict[str, dict[str, int]]:
    """Per op type that carries weights: how many nodes had constant weights, how many of those were
    quantized, and how many still compute with float weights (read straight from an initializer)."""
    import onnx

    def float_weighted(model: Any) -> Counter[str]:
        constants = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
        return Counter(n.op_type for n in model.graph.node if n.op_type in _WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in constants)

    original, remaining = float_weighted(onnx.load(str(before))), float_weighted(onnx.load(str(after)))
    return {op: {"with_weights": n, "quantized": n - remaining[op], "float": remaining[op]} for op, n in sorted(original.items())}


def resolve_nodes(model_file: Path, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(node names, names found nowhere) for `names` given as node names or as the names of the
    tensors the nodes make: tensor names survive the pre-processing that may rename nodes, and are
    what toolkit.compile.localize reports."""
    import onnx

    if not names:
        return [], []
    graph = onnx.load(str(model_file), load_external_data=False).graph
    nodes = {n.name for n in graph.node}
    makers = {o: n.name for n in graph.node for o in n.output}
    found = [name if name in nodes else makers.get(name) for name in names]
    return list(dict.fromkeys(f for f in found if f)), [name for name, f in zip(names, found, strict=True) if not f]


def saturating_cpu() -> bool:
    """Whether this is an x86 CPU without VNNI: onnxruntime's uint8 × int8 kernels there sum pairs of
    products in 16 bits (AVX2's vpmaddubsw), which saturates with full-range int8 weights."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return bool(flags) and not ({"avx512_vnni", "avx_vnni"} & set(flags.split()))


def reduced_range(asked: bool | None, say: Callable[[str], None]) -> bool:
    """Whether to quantize weights to 7 bits: as asked, else where this CPU would saturate. Dynamic
    and static (QDQ) int8 run the same uint8 × int8 kernels, so both need it there."""
    if asked is not None:
        return asked
    if saturating_cpu():
        say("this CPU has no VNNI: weights quantized to 7 bits, so that its uint8 × int8 products do not saturate")
        return True
    return False
