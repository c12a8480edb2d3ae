"""ONNX file helpers shared by the stages that write models."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

# onnx >= 1.23 writes IR version 14 by default, which onnxruntime-gpu 1.31 refuses ("max supported IR
# version: 13"); every model this project writes is capped here.
IR_VERSION_CAP = 10
# Protobuf cannot serialise more than 2 GiB; larger models keep their weights in a side file.
_EXTERNAL_DATA_THRESHOLD = 1 << 30


def save_model(proto: onnx.ModelProto, path: Path) -> list[str]:
    """Writes `proto` to `path`; returns the names of external-data files written beside it."""
    proto.ir_version = min(proto.ir_version, IR_VERSION_CAP)
    external = proto.ByteSize() > _EXTERNAL_DATA_THRESHOLD
    data_file = f"{path.name}.data"
    onnx.save_model(proto, str(path), save_as_external_data=external, location=data_file, all_tensors_to_one_file=True)
    return [data_file] if external else []


def default_opset(proto: onnx.ModelProto) -> int:
    """The model's version of the default ONNX domain (0 if it imports none)."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def value_shape(value: onnx.ValueInfoProto) -> tuple[int | str, ...]:
    dims = value.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)


def value_dtype(value: onnx.ValueInfoProto) -> str:
    return helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
