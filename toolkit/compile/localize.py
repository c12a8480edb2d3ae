"""Where a variant departs from its fp32 graph: `toolkit check DIR --variant V --localize`.

Both graphs go into one ONNX model side by side (the variant's names prefixed, its inputs fed from
the reference's, cast where its input types differ), so that one onnxruntime run computes any
tensor of both on the same inputs. Tensors are matched by name (the quantizers and the fp16
converter keep the names of the tensors they replace), in the reference's topological order, and
each is judged by its error relative to its own scale: max|variant - fp32| / max|fp32|.

A first run computes the outputs alone, as the variant runs: for fp16 (judged elementwise) only
where an output departs past the tolerance is there something to localize. (A run with intermediate tensors exposed keeps each
in its declared type, so onnxruntime cannot drop the casts around the fp16 ops it computes in fp32
on the CPU: exposed, such an op overflows where the plain run does not.) Then one of two modes.
`all` exposes every matched tensor in one more run. `bisect`, for models whose intermediate tensors
do not fit in memory at once, exposes one tensor per run: a binary search over the ordered tensors
finds the first one past the tolerance (assuming an error, once made, reaches every later tensor:
⌈log2 N⌉ runs), and a last run measures that node's inputs, which says whether the node made the
error or received it: ⌈log2 N⌉ + 2 runs in all.

Each tensor is named with the PyTorch module that made it: the dynamo exporter records the module
path in each node's metadata (`pkg.torch.onnx.name_scopes`), the TorchScript exporter in the node's
name (`/encoder/layers.0/fc2/MatMul`). The value range that explains the error is named where it
can be: fp16 overflow (the reference passes 65504), and for int8 an input with an outlier channel
(one channel's range many times the others', so that one scale for the tensor leaves the rest few
levels) or a static scale the input saturates.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from toolkit._onnx import model_bytes
from toolkit.bundle import Bundle
from toolkit.compile.tolerances import localize_tolerance, profile
from toolkit.errors import ToolkitError
from toolkit.spec import ModelSpec

__all__ = ["Localization", "TensorError", "growth", "localize", "module_path"]

MODES = ("all", "bisect")
_PREFIX = "variant/"
_FP16_MAX = 65504.0
_ROWS = 16  # rows the intermediate tensors are compared on: every one of two graphs at once must fit in memory
_CHUNK, _DECODER_CHUNK = 64, 8  # rows a run of the outputs alone takes (a decoder's are logits over its vocabulary)
_SENTINEL = float(np.finfo(np.float32).max) / 2
_OUTLIER_RATIO = 20.0  # one channel's range this many times the median channel's: per-tensor int8 keeps the others few levels
# ops whose inputs hold their channels on axis 1 (NCHW, NCL), not last as a transformer's activations do
_WEIGHTED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "LSTM", "GRU", "Attention")
_CHANNELS_FIRST = ("Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization", "MaxPool", "AveragePool", "GlobalAveragePool")


@dataclass(frozen=True)
class TensorError:
    """One tensor of the reference graph against the same tensor of the variant."""

    tensor: str
    node: str  # the reference node that makes it
    op: str
    module: str  # the PyTorch module path, "" where the exporter recorded none
    max_abs: float
    rel: float  # max_abs / scale
    scale: float  # max |fp32|
    inputs_rel: float | None  # the largest rel among the node's matched inputs; None where none was measured
    cause: str = ""  # the value range that explains it, where one does
    culprit: str = ""  # the tensor whose range the cause names (an input of the node, or of the weighted node before it)


@dataclass
class Localization:
    """Where `variant` departs from `reference` on one set of inputs."""

    bundle: str
    variant: str
    reference: str
    precision: str
    tolerance: float  # rel: a tensor departs past this
    mode: str
    inputs: str  # what the graphs ran on
    runs: int  # onnxruntime runs of the paired graph
    matched: int  # tensors both graphs have
    outputs: list[TensorError]  # the graph outputs
    first: TensorError | None  # the first tensor, in topological order, past the tolerance
    growth: TensorError | None  # where the error grows most (the node's error less its inputs')
    tensors: list[TensorError] = field(default_factory=list)  # every measured tensor, in order

    def to_json(self) -> dict[str, Any]:
        """As JSON allows: an infinite error (an overflow) as the string "inf"."""
        def plain(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return str(value)
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return [plain(v) for v in value] if isinstance(value, list) else value

        return plain(asdict(self))


def localize(bundle: str | Path | Bundle, variant: str, *, reference: str = "fp32", provider: str = "cpu", mode: str = "all",
             feeds: Mapping[str, np.ndarray] | None = None, spec: ModelSpec | None = None,
             progress: Callable[[str], None] | None = None, trust_source: bool = False) -> Localization:
    """Runs `variant` and `reference` of the bundle side by side on `feeds` (default: the model's
    held-out sample inputs, else check's first case, from `spec`, the bundle's PyTorch reference,
    built here when not given) and finds where the variant's error leaves its precision's tolerance
    and where it grows most. `mode`: "all" or "bisect" (module docstring). `trust_source` vouches for the code the manifest's source names (see `bundle_reference`)."""
    import onnx

    say = progress or (lambda _msg: None)
    if mode not in MODES:
        raise ToolkitError(f"unknown localize mode {mode!r}; choose {', '.join(MODES)}.")
    bundle = Bundle.of(bundle, trust_source=trust_source)
    if variant == reference:
        raise ToolkitError(f"variant {variant!r} is the reference graph itself; localize another variant against it.")
    precision = bundle.variant(variant).precision
    tolerance = localize_tolerance(precision)
    ref_proto = onnx.load(str(bundle.variant_path(reference)))
    var_proto = onnx.load(str(bundle.variant_path(variant)))
    given = feeds
    described, feeds = ("the given inputs", dict(feeds)) if feeds is not None else _default_feeds(bundle, spec, say)
    feeds = {t.name: np.asarray(feeds[t.name]).astype(t.dtype) for t in bundle.manifest.inputs}
    if given is None and len({len(v) for v in feeds.values()}) != 1:  # not rows of one batch: the first rows
        feeds = {name: value[:_ROWS] for name, value in feeds.items()}
    seen = variant_names(var_proto)
    paired = _Paired(ref_proto, var_proto, provider, seen)
    graph = _ReferenceGraph(ref_proto, seen, _static_scales(var_proto), precision)
    outputs = [o.name for o in ref_proto.graph.output]
    say(f"running {variant} beside {reference} on {described} ({len(graph.order)} matched tensors, mode {mode})")
    # the outputs alone first: a run with intermediate tensors exposed keeps each in its own type
    # (onnxruntime then cannot drop the casts around fp16 ops it runs in fp32), so where the outputs
    # are judged elementwise (fp16, fp32), only a departure the plain run shows is one to localize; an
    # int8 variant is judged by its task metric, which outputs within 5% can still fail (a near-tie)
    ends, worst = _outputs_pass(paired, graph, outputs, feeds, _DECODER_CHUNK if bundle.manifest.task == "generate" else _CHUNK)
    if given is None and len(worst) > _ROWS:  # the held-out rows where the variant departs most: its failing cases
        keep = np.sort(worst[:_ROWS])
        feeds = {name: value[keep] for name, value in feeds.items()}
        described = f"the {_ROWS} of {len(worst)} {described} where {variant}'s outputs depart most"
    departs = any(e is not None and e.rel > tolerance for e in ends) or profile(precision).rel is None
    if not departs:
        say(f"no output of {variant} departs from {reference} past rel {tolerance:g} on these inputs: nothing to localize")
        measured, first, grows = [], None, None
    elif mode == "all":
        values = paired.run(graph.order, feeds)
        ends = [graph.error(name, values) for name in outputs]
        measured = [e for e in (graph.error(name, values) for name in graph.order) if e is not None]
        measured = [_with_inputs(e, graph, {m.tensor: m for m in measured}) for e in measured]
        first = next((e for e in measured if e.rel > tolerance), None)
        grows = max((e for e in measured if e.rel > tolerance), key=lambda e: growth(e, tolerance), default=None)
    else:
        measured, first = _bisect(paired, graph, feeds, tolerance)
        grows = first
    return Localization(str(bundle.path), variant, reference, precision, tolerance, mode, described, paired.runs, len(graph.order),
                        [e for e in ends if e is not None], first, grows, measured)


def _outputs_pass(paired: _Paired, graph: _ReferenceGraph, outputs: list[str], feeds: dict[str, np.ndarray],
                  chunk: int) -> tuple[list[TensorError | None], np.ndarray]:
    """The outputs' errors over all of `feeds` (per output, the chunk of `chunk` rows where it is
    largest), and the rows ordered from the one whose outputs depart most (empty where the feeds are
    not rows of a batch)."""
    rows = {len(v) for v in feeds.values() if np.ndim(v)}
    if len(rows) != 1 or rows == {0}:
        values = paired.run(outputs, feeds)
        return [graph.error(name, values) for name in outputs], np.arange(0)
    (total,) = rows
    ends: list[TensorError | None] = [None] * len(outputs)
    row_error = {name: np.zeros(total) for name in outputs}
    scale = dict.fromkeys(outputs, 0.0)
    for start in range(0, total, chunk):
        values = paired.run(outputs, {k: v[start : start + chunk] for k, v in feeds.items()})
        for i, name in enumerate(outputs):
            error = graph.error(name, values)
            if error is not None and (ends[i] is None or error.rel > ends[i].rel):
                ends[i] = error
            if error is None or values[name].ndim == 0:
                continue
            expected, got = values[name].astype(np.float64), values[graph.variant[name]].astype(np.float64)
            kept = np.abs(expected) < _SENTINEL
            with np.errstate(invalid="ignore", over="ignore"):
                diff = np.nan_to_num(np.where(kept, np.abs(got - expected), 0.0), nan=np.inf, posinf=np.inf)
            row_error[name][start : start + len(diff)] = diff.reshape(len(diff), -1).max(axis=1)
            scale[name] = max(scale[name], float(np.abs(np.where(kept, expected, 0.0)).max()))
    worst = np.max([row_error[name] / (scale[name] or 1.0) for name in outputs], axis=0)
    return ends, np.argsort(-worst, kind="stable")


def _bisect(paired: _Paired, graph: _ReferenceGraph, feeds: dict[str, np.ndarray], tolerance: float) -> tuple[list[TensorError], TensorError | None]:
    """A binary search for the first tensor past the tolerance, one tensor a run (⌈log2 N⌉ runs),
    then a run for that tensor and its node's inputs, which also confirms it."""
    order = [name for name in graph.order if graph.is_float(name)]
    if not order:
        return [], None
    measured: dict[str, TensorError] = {}
    low, high = 0, len(order) - 1
    while low < high:
        middle = (low + high) // 2
        error = graph.error(order[middle], paired.run([order[middle]], feeds))
        if error is not None:
            measured[error.tensor] = error
        if error is not None and error.rel > tolerance:
            high = middle
        else:
            low = middle + 1
    found = order[low]
    inputs = [name for name in graph.inputs_of(found) if graph.is_float(name)]
    values = paired.run([found, *inputs], feeds)
    for name in (found, *inputs):
        error = graph.error(name, values)
        if error is not None:
            measured[name] = error
    first = _with_inputs(measured[found], graph, measured) if found in measured and measured[found].rel > tolerance else None
    if first is not None:
        measured[found] = first
    return [measured[name] for name in graph.order if name in measured], first


def growth(error: TensorError, tolerance: float) -> float:
    """How many times the node multiplied the error it received (inputs never measured: none received)."""
    received = max(error.inputs_rel or 0.0, tolerance / 100)
    return 1.0 if math.isinf(error.rel) and math.isinf(received) else error.rel / received


def _with_inputs(error: TensorError, graph: _ReferenceGraph, measured: Mapping[str, TensorError]) -> TensorError:
    rels = [measured[name].rel for name in graph.inputs_of(error.tensor) if name in measured]
    return replace(error, inputs_rel=max(rels) if rels else None)


class _ReferenceGraph:
    """The reference graph's tensors that the variant also computes, in topological order, with the
    node and module that make each."""

    def __init__(self, proto: Any, variant: dict[str, str], scales: dict[str, float], precision: str):
        import onnx

        self.scales, self.precision = scales, precision  # a static variant's input scales; the variant's precision
        self.variant = {name: _PREFIX + seen for name, seen in variant.items()}  # a tensor → where the variant's consumers read it
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
        self.types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
        self.producers = {o: n for n in proto.graph.node for o in n.output if o}
        self.order = [o for n in proto.graph.node for o in n.output if o and o in variant]
        self.initializers = {t.name: t for t in proto.graph.initializer}

    def is_float(self, name: str) -> bool:
        import onnx

        return self.types.get(name) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, None)

    def inputs_of(self, name: str) -> list[str]:
        node = self.producers.get(name)
        return [i for i in node.input if i and i in self.producers] if node is not None else []

    def error(self, name: str, values: Mapping[str, np.ndarray]) -> TensorError | None:
        if name not in values or self.variant.get(name) not in values:
            return None
        expected, got = values[name], values[self.variant[name]]
        if expected.dtype.kind != "f" or got.shape != expected.shape or not expected.size:
            return None
        expected, got = expected.astype(np.float64), got.astype(np.float64)
        # a mask's "minus infinity" (float32's lowest, -3.4e38) is fp16's -inf or -65504 (plus a bias): no
        # arithmetic to compare there; what it masks shows in the tensors after it (the softmax)
        sentinel = np.abs(expected) >= _SENTINEL
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.where(sentinel, 0.0, np.abs(got - expected))
        max_abs = float(np.nan_to_num(diff, nan=np.inf, posinf=np.inf).max())
        scale = float(np.abs(np.where(sentinel, 0.0, expected)).max())
        node = self.producers[name]
        return TensorError(name, node.name, node.op_type, module_path(node), max_abs, max_abs / scale if scale > 0 else max_abs, scale,
                           None, *self._cause(node, values, expected, got))

    def _cause(self, node: Any, values: Mapping[str, np.ndarray], expected: np.ndarray, got: np.ndarray) -> tuple[str, str]:
        """The value range that explains a tensor's error, and the tensor it names."""
        precision = self.precision
        if precision == "fp16":
            ranges = [(name, float(np.abs(values[name][np.abs(values[name]) < _SENTINEL]).max(initial=0.0)))
                      for name in (*node.input, node.output[0]) if name in values and values[name].dtype.kind == "f" and values[name].size]
            past = [(name, peak) for name, peak in ranges if peak > _FP16_MAX]
            if past or not np.isfinite(got).all():
                name, peak = max(past, key=lambda p: p[1]) if past else (node.output[0], float(np.abs(expected).max()))
                return f"fp16 overflow: {name} reaches {peak:.4g} in fp32, past fp16's largest {_FP16_MAX:.0f}", name
            return "", ""
        if precision != "int8":
            return "", ""
        for reader in self._readers(node):
            for name in reader.input:
                if name in values and values[name].dtype.kind == "f" and values[name].ndim >= 2 and name not in self.initializers:
                    cause = _int8_range(name, values[name], self.scales.get(name), 1 if reader.op_type in _CHANNELS_FIRST else -1)
                    if cause:
                        return cause, name
        return "", ""

    def _readers(self, node: Any) -> list[Any]:
        """`node`, and the nodes before it while each has one computed input (an activation after a
        Gemm or Conv): the quantizer rounds what the first of them reads, and the error shows after
        the last."""
        chain = [node]
        while len(chain) < 4:
            computed = [i for i in chain[-1].input if i in self.producers and i not in self.initializers]
            if len(computed) != 1 or chain[-1].op_type in _WEIGHTED_OPS:
                break
            chain.append(self.producers[computed[0]])
        return chain


def _int8_range(name: str, x: np.ndarray, scale: float | None, axis: int) -> str:
    """An int8 input's range problem: a calibrated scale it saturates, or an outlier channel (its
    channels along `axis`)."""
    peak = float(np.abs(x[np.abs(x) < _SENTINEL]).max(initial=0.0))
    if scale is not None and peak > 128 * scale * 1.05:
        return f"int8 saturation: {name} reaches {peak:.4g}, past its calibrated range ±{127 * scale:.4g}"
    channels = np.abs(np.moveaxis(np.where(np.abs(x) < _SENTINEL, x, 0.0), axis, -1).reshape(-1, x.shape[axis])).max(axis=0)
    median = float(np.median(channels))
    if median > 0 and channels.max() / median > _OUTLIER_RATIO:
        channel = int(channels.argmax())
        return (f"int8 outlier channel: {name} channel {channel} reaches {channels.max():.4g}, {channels.max() / median:.0f}× the "
                f"median channel's {median:.3g}; one scale for the tensor leaves the others few of int8's 256 levels")
    return ""


def _static_scales(variant: Any) -> dict[str, float]:
    """Each tensor a static (QDQ) variant quantizes → the scale of its QuantizeLinear."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in variant.graph.initializer}
    return {node.input[0]: float(numpy_helper.to_array(initializers[node.input[1]]).max())
            for node in variant.graph.node if node.op_type == "QuantizeLinear" and node.input[1] in initializers}


def variant_names(proto: Any) -> dict[str, str]:
    """Each tensor a node of the variant makes → the name under which its consumers read its value:
    in a static int8 (QDQ) graph, the output of the DequantizeLinear that follows its QuantizeLinear
    (the value with the variant's rounding and clipping; the QDQ quantizer also drops a Relu after a
    quantized node and gives its output name to that node, whose own output then is not the Relu's)."""
    quantized = {n.input[0]: n.output[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    dequantized = {n.input[0]: n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    names = {o: o for n in proto.graph.node for o in n.output if o}
    for tensor, q in quantized.items():
        if tensor in names and q in dequantized:
            names[tensor] = dequantized[q]
    return names


def module_path(node: Any) -> str:
    """The PyTorch module that made `node`: the dynamo exporter's name scopes, else the TorchScript
    exporter's node name."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            return scopes[-2] if len(scopes) >= 2 else ""
    if node.name.startswith("/"):
        return ".".join(node.name.strip("/").split("/")[:-1])
    return ""


class _Paired:
    """The reference and the variant in one model, so that one run computes tensors of both."""

    def __init__(self, reference: Any, variant: Any, provider: str, seen: dict[str, str]):
        from onnx import compose, helper

        variant = compose.add_prefix(variant, _PREFIX)
        types = {i.name: i.type.tensor_type.elem_type for i in reference.graph.input}
        bridges = []
        for value in variant.graph.input:
            original = value.name.removeprefix(_PREFIX)
            if original not in types:
                raise ToolkitError(f"the variant takes input {original!r}, which the reference graph does not.")
            wanted = value.type.tensor_type.elem_type
            bridges.append(helper.make_node("Identity", [original], [value.name]) if wanted == types[original] else
                           helper.make_node("Cast", [original], [value.name], to=wanted))
        opsets = {o.domain: o.version for o in reference.opset_import}
        for o in variant.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
        graph = helper.make_graph([*reference.graph.node, *bridges, *variant.graph.node], "paired", list(reference.graph.input), [],
                                  [*reference.graph.initializer, *variant.graph.initializer],
                                  value_info=[*reference.graph.value_info, *variant.graph.value_info])
        self.model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                                       ir_version=max(reference.ir_version, variant.ir_version))
        self.model.functions.extend([*reference.functions, *variant.functions])
        self.provider, self.runs, self.seen = provider, 0, seen
        self._last: tuple[list[str], Any] = ([], None)
        self._large = model_bytes(self.model) > (1 << 31) - (1 << 26)
        self._produced = {o for n in self.model.graph.node for o in n.output}

    def run(self, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One run with `names` of both graphs as the outputs (those the variant lacks, of the reference only)."""
        wanted = list(dict.fromkeys(n for name in names for n in (name, _PREFIX + self.seen.get(name, name)) if n in self._produced))
        if self._last[0] != wanted:  # the same outputs run on chunk after chunk of rows: one session for them
            self._last = (wanted, None)  # the old session freed before the new one is built: two may not fit
            self._last = (wanted, self._session(wanted))
        self.runs += 1
        values = self._last[1].run(wanted, dict(feeds))
        return dict(zip(wanted, values, strict=True))

    def _session(self, wanted: list[str]) -> Any:
        import onnx
        from onnx import helper

        from toolkit.runtime.session import new_session

        del self.model.graph.output[:]
        self.model.graph.output.extend([helper.make_empty_tensor_value_info(name) for name in wanted])
        with tempfile.TemporaryDirectory(prefix="toolkit-localize-") as work:
            if self._large:  # past protobuf's 2 GiB: the weights beside the graph
                path = Path(work) / "paired.onnx"
                onnx.save_model(self.model, str(path), save_as_external_data=True, location="paired.onnx.data")
                return new_session(str(path), self.provider)
            return new_session(self.model.SerializeToString(), self.provider)


def _default_feeds(bundle: Bundle, spec: ModelSpec | None, say: Callable[[str], None]) -> tuple[str, dict[str, np.ndarray]]:
    """The model's held-out sample inputs (all its rows: localize picks those where the variant
    departs most), else check's first case."""
    from toolkit.compile.parity import _case_feeds
    from toolkit.reference.source import bundle_reference
    from toolkit.spec import shape_cases

    if spec is None:
        say(f"building the PyTorch reference ({bundle.manifest.source.describe()}) for the inputs")
        spec = bundle_reference(bundle)
    if spec.sample_data is not None:
        return "held-out sample rows", spec.sample_data()
    sizes = shape_cases(bundle.manifest.dims)[0]
    return f"check's first case {sizes}", _case_feeds(spec, sizes, 0, generation=bundle.manifest.generation)

