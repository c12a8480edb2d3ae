"""ONNX file helpers shared by the stages that write models."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

# onnx >= 1.23 writes IR version 14 by default, which onnxruntime-gpu 1.31 refuses ("max supported IR
# version: 13"); every model this project writes is capped here.
IR_VERSION_CAP = 10
# Protobuf cannot serialise more than 2 GiB: models past this size keep their weights in one side
# file, `<model file>.data`. TOOLKIT_EXTERNAL_DATA_BYTES lowers it (the tests take small models
# through the large-model path); child processes inherit it with the environment.
_EXTERNAL_DATA_BYTES = 1 << 30


def external_data_threshold() -> int:
    return int(os.environ.get("TOOLKIT_EXTERNAL_DATA_BYTES", _EXTERNAL_DATA_BYTES))


def save_model(proto: onnx.ModelProto, path: Path | str, transform: Callable[[onnx.TensorProto], onnx.TensorProto] | None = None,
               *, external: bool | None = None) -> list[str]:
    """Writes `proto` to `path`, its weights in `<name>.data` beside it when the model is past the
    external-data threshold (or as `external` says: a tool whose input kept its weights beside it
    writes its output so too); returns the names of the external-data files written. `transform`
    gives each initializer as written (the model's own are left as they are, unless written beside it).

    Below the threshold the model is written a weight at a time: serialized whole, it would be held
    twice at once (the message and its bytes). A serialized message may carry a repeated field in
    several parts, so the graph goes first without its weights and each weight follows as a message
    of its own; the file is the same model."""
    path = Path(path)
    proto.ir_version = min(proto.ir_version, IR_VERSION_CAP)
    external = model_bytes(proto) > external_data_threshold() if external is None else external
    data_file = f"{path.name}.data"
    (path.parent / data_file).unlink(missing_ok=True)  # onnx appends to a data file already there
    if external:
        if transform is not None:
            for index, tensor in enumerate(proto.graph.initializer):
                proto.graph.initializer[index].CopyFrom(transform(tensor))
        _typed_to_raw(proto)
        # tensors under 1 KiB (shapes, axes) stay in the graph: onnxruntime's shape inference reads them at load
        onnx.save_model(proto, str(path), save_as_external_data=True, location=data_file, all_tensors_to_one_file=True,
                        size_threshold=1024)
        return [data_file]
    skeleton = _copy_without(proto, "graph", onnx.ModelProto())
    skeleton.graph.CopyFrom(_copy_without(proto.graph, "initializer", onnx.GraphProto()))
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as out:
        out.write(skeleton.SerializeToString())
        for tensor in proto.graph.initializer:
            part = onnx.ModelProto()
            part.graph.initializer.append(transform(tensor) if transform is not None else tensor)
            out.write(part.SerializeToString())
    os.replace(partial, path)
    return []


def model_bytes(proto: onnx.ModelProto) -> int:
    """About the serialized size of `proto`, from its weights' shapes and the rest's own sizes.
    protobuf's ByteSize() serializes the message to count it: a transient buffer of up to 2.7× the
    model (measured on a 215 MB decoder: 938 → 1,529 MiB while it ran)."""
    total = 0
    for tensor in proto.graph.initializer:
        if tensor.HasField("raw_data") and tensor.data_type in _ITEM_BYTES:
            total += int(np.prod(tensor.dims, dtype=np.int64)) * _ITEM_BYTES[tensor.data_type] + len(tensor.name) + 16
        else:
            total += tensor.ByteSize()
    graph = proto.graph
    return total + sum(part.ByteSize() for field in (graph.node, graph.input, graph.output, graph.value_info, graph.sparse_initializer)
                       for part in field) + sum(p.ByteSize() for field in (proto.metadata_props, proto.functions) for p in field)


_ITEM_BYTES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.DOUBLE: 8,
               onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT16: 2, onnx.TensorProto.UINT16: 2,
               onnx.TensorProto.INT32: 4, onnx.TensorProto.UINT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.UINT64: 8,
               onnx.TensorProto.BOOL: 1}


def _copy_without(message: Any, left_out: str, into: Any) -> Any:
    """`into` with every field of `message` set as there, but `left_out`."""
    for field, value in message.ListFields():
        if field.name == left_out:
            continue
        # protobuf 6 deprecates `label` for `is_repeated`, which earlier versions lack
        if field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED:
            getattr(into, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(into, field.name).CopyFrom(value)
        else:
            setattr(into, field.name, value)
    return into


def _typed_to_raw(proto: onnx.ModelProto) -> None:
    """Tensors kept in typed fields (float_data, as the quantizer writes its scales) as raw bytes:
    onnx moves only raw data out of the graph."""
    from onnx import numpy_helper

    for tensor in _tensors(proto):
        if not tensor.HasField("raw_data") and tensor.data_type != onnx.TensorProto.STRING and tensor.ByteSize() >= 1024:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))


def is_large(path: Path) -> bool:
    """Whether the model at `path` keeps its weights beside it, or is past the threshold: the tools
    that rewrite it must then write their output with external data too."""
    return path.stat().st_size > external_data_threshold() or bool(external_files(path))


def external_files(path: Path | bytes) -> list[str]:
    """The external-data files the ONNX file at `path` (or the serialized model) reads (names relative to its directory)."""
    from onnx.external_data_helper import uses_external_data

    proto = onnx.load_from_string(path) if isinstance(path, bytes) else onnx.load(str(path), load_external_data=False)
    return sorted({e.value for t in _tensors(proto) if uses_external_data(t) for e in t.external_data if e.key == "location"})


def _tensors(proto: onnx.ModelProto) -> Any:
    """Every tensor of the model, subgraphs' included: onnx's own walk, the one its external-data
    saving uses."""
    from onnx import external_data_helper

    return external_data_helper._get_all_tensors(proto)


def default_opset(proto: onnx.ModelProto) -> int:
    """The model's version of the default ONNX domain (0 if it imports none)."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def value_shape(value: onnx.ValueInfoProto) -> tuple[int | str, ...]:
    dims = value.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)


def value_dtype(value: onnx.ValueInfoProto) -> str:
    return helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name


_SHAPE_VALUES = 1024  # elements: an initializer up to this size may be a shape, whose values inference reads


def without_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `proto` for shape inference, with each weight (an initializer over _SHAPE_VALUES
    elements) a graph input of its type and shape: inference needs their shapes, not their values,
    and onnx's and onnxruntime's inferences copy the model they are given several times over."""
    import math

    graph = proto.graph
    light = onnx.ModelProto(ir_version=proto.ir_version, opset_import=proto.opset_import, functions=proto.functions)
    light.graph.node.extend(graph.node)
    light.graph.input.extend(graph.input)
    light.graph.output.extend(graph.output)
    light.graph.value_info.extend(graph.value_info)
    inputs = {i.name for i in graph.input}
    for tensor in graph.initializer:
        if math.prod(tensor.dims) <= _SHAPE_VALUES:
            light.graph.initializer.append(tensor)
        elif tensor.name not in inputs:
            light.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return light
