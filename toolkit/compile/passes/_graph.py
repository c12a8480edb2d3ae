"""Facts about an ONNX graph that several rewrites need: its constants, the ranks and static dims
shape inference found, who reads what, and dropping what nothing reads."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from toolkit._onnx import default_opset, without_weights

__all__ = ["Constants", "Dim", "attribute", "can_raise_default_opset", "constants", "infer_shape_facts", "perm", "prune", "raise_default_opset", "readers_of", "record_inferred_shapes", "shape_facts", "sole_reader", "subgraph_reads"]

Dim = int | tuple[str, int]  # a static size, or axis i of tensor t as it is at run time


def infer_shape_facts(proto: Any) -> tuple[dict[str, int], dict[tuple[str, int], int]]:
    """Rank of every tensor whose rank is known, and each dim that ONNX shape inference found static.
    Inference runs on a copy of the graph whose weights are inputs of their type and shape: it needs
    no weight's values, and a copy with them would hold the model twice more (serialized and parsed)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(without_weights(proto), strict_mode=False)
    except ValueError:  # over protobuf's 2 GiB even so: the shapes the graph records are used as they are
        inferred = proto
    return shape_facts(inferred.graph)


def record_inferred_shapes(proto: Any) -> Any:
    """Records in `proto`'s value_info what ONNX shape inference finds (in place; returns it), inferred
    as `infer_shape_facts` does, without the weights: for tools that would otherwise infer on the
    whole model (onnxruntime's fp16 converter)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(without_weights(proto), strict_mode=False)
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(inferred.graph.value_info)
    return proto


class Constants(Mapping[str, np.ndarray]):
    """The graph's constant tensors by name, each converted to numpy only when read: the rules read a
    few scalars and shapes, and converting every weight up front would copy the whole model."""

    def __init__(self, tensors: dict[str, Any]):
        self._tensors = tensors

    def __getitem__(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self._tensors[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def size(self, name: str) -> int:
        """How many elements constant `name` holds, read off its dims."""
        return math.prod(self._tensors[name].dims)

    def is_shape(self, name: str) -> bool:
        """Whether `name` is an int64 scalar or vector, as shapes, axes and indices are."""
        from onnx import TensorProto

        tensor = self._tensors[name]
        return tensor.data_type == TensorProto.INT64 and len(tensor.dims) <= 1

    def scalar(self, name: str) -> float | None:
        """The value of `name` where it is a constant of one element, else None."""
        return float(self[name].reshape(())) if name in self._tensors and self.size(name) == 1 else None


def constants(graph: Any) -> Constants:
    """Initializers and Constant outputs, less the initializers a caller may override (graph inputs too)."""
    inputs = {i.name for i in graph.input}
    tensors = {t.name: t for t in graph.initializer if t.name not in inputs}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                tensors[node.output[0]] = value
    return Constants(tensors)


def readers_of(graph: Any) -> dict[str, list[Any]]:
    """For each tensor's name, the nodes that read it, in graph order."""
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def sole_reader(graph: Any) -> Callable[[str], Any]:
    """For a tensor's name: the one node that reads it, or None where several or none do, or where
    it is a graph output (whose value must stay as it is)."""
    readers = readers_of(graph)
    outputs = {o.name for o in graph.output}

    def reader(name: str) -> Any:
        found = readers.get(name, [])
        return found[0] if len(found) == 1 and name not in outputs else None

    return reader


def shape_facts(graph: Any) -> tuple[dict[str, int], dict[tuple[str, int], int]]:
    """Rank of every tensor whose rank is known, and each dim that shape inference found static."""
    ranks: dict[str, int] = {}
    static: dict[tuple[str, int], int] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        ranks[value.name] = len(tensor.shape.dim)
        for axis, dim in enumerate(tensor.shape.dim):
            if dim.HasField("dim_value"):
                static[value.name, axis] = dim.dim_value
    return ranks, static


def perm(node: Any, rank: int | None) -> list[int] | None:
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return perm if perm is not None else None if rank is None else list(reversed(range(rank)))


def attribute(node: Any, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def prune(graph: Any) -> None:
    """Drops nodes nothing reads, and the initializers and shape records only they read."""
    needed = {o.name for o in graph.output} | subgraph_reads(graph)
    kept = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output if out):
            kept.append(node)
            needed.update(n for n in node.input if n)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    for index in reversed(range(len(graph.initializer))):  # in place: extending the field anew would copy every weight
        if graph.initializer[index].name not in needed:
            del graph.initializer[index]
    produced = needed | {out for node in kept for out in node.output}
    records = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(records)


def subgraph_reads(graph: Any) -> set[str]:
    """Every name read inside the graph's subgraphs (If, Loop, Scan bodies), outer-scope names among them."""
    from onnx import AttributeProto

    reads: set[str] = set()
    for node in graph.node:
        for attribute in node.attribute:
            bodies = [attribute.g] if attribute.type == AttributeProto.GRAPH else list(attribute.graphs)
            for body in bodies:
                reads |= {n for inner in body.node for n in inner.input} | {o.name for o in body.output} | subgraph_reads(body)
    return reads


# Default-domain ops whose newer versions up to opset 23 only admit more types or add an attribute
# whose default keeps the older meaning, so a node of them means the same at any version up to 23.
# Ops whose meaning changed are absent (DFT 20, GridSample 20, GroupNormalization 21), as are
# control flow's (If, Loop, Scan: their bodies would need the same check).
_SAME_MEANING_TO_23 = frozenset({
    "AveragePool", "Cast", "CastLike", "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "DequantizeLinear", "Dropout",
    "Elu", "Equal", "Flatten", "GlobalAveragePool", "GlobalMaxPool", "GRU", "HardSigmoid", "HardSwish", "Identity",
    "InstanceNormalization", "IsInf", "IsNaN", "LSTM", "MaxPool", "Mish", "Pad", "QuantizeLinear", "ReduceMax", "ReduceMin",
    "Reshape", "Resize", "RNN", "Round", "Selu", "Shape", "Sin", "Size", "Softplus", "Softsign", "Squeeze", "Tan", "Transpose",
    "Unsqueeze",
})


def can_raise_default_opset(proto: Any, version: int) -> bool:
    """Whether every op in the graph's default domain means the same at `version` (at most 23) as at
    the graph's own version. onnxruntime's own ops in the default domain (SimplifiedLayerNormalization)
    have no ONNX schema and are looked up the same at any version."""
    import onnx
    from onnx import defs

    current = default_opset(proto)
    if not 0 < current <= version <= 23:
        return False
    for op in {n.op_type for n in proto.graph.node if n.domain in ("", "ai.onnx")}:
        try:
            before, after = defs.get_schema(op, current).since_version, defs.get_schema(op, version).since_version
        except onnx.defs.SchemaError:
            continue
        if before != after and op not in _SAME_MEANING_TO_23:
            return False
    return True


def raise_default_opset(proto: Any, version: int) -> None:
    """Raises the graph's default-domain opset to `version`, in place (see can_raise_default_opset)."""
    if not can_raise_default_opset(proto, version):
        raise ValueError(f"the graph's ops cannot all move from opset {default_opset(proto)} to {version} unchanged")
    next(o for o in proto.opset_import if o.domain in ("", "ai.onnx")).version = version
