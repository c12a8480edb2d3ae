"""Static int8 (QDQ): activation ranges calibrated ahead of time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from toolkit._onnx import is_large
from toolkit.bundle import Bundle
from toolkit.compile.quantization._common import (
    QuantizeContext,
    calibration_feeds,
    op_report,
    preprocess,
    reduced_range,
    resolve_nodes,
)
from toolkit.compile.quantization.configs import Int8Static
from toolkit.spec import ModelSpec

__all__ = ["quantize_int8_static", "static_applies"]


def quantize_int8_static(context: QuantizeContext, config: Int8Static, model_file: Path, target: Path) -> dict[str, Any]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    pre, options = preprocess(context, model_file)
    chosen, unknown = resolve_nodes(pre, config.exclude)
    if chosen:
        context.say(f"keeping {len(chosen)} nodes in fp32: {', '.join(chosen)}")
    reduce_range = reduced_range(config.reduce_range, context.say)
    feeds, origin = calibration_feeds(context, config.calibration_samples)
    context.say(f"calibrating on {len(feeds)} samples from {origin} ({config.method}{', per channel' if config.per_channel else ''})")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._items, None)

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    quantize_static(
        str(pre), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=config.per_channel, reduce_range=reduce_range,
        calibrate_method=method[config.method], activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        use_external_data_format=is_large(pre), nodes_to_exclude=chosen,
    )
    return {
        **options, "format": "QDQ", "per_channel": config.per_channel, "reduce_range": reduce_range, **({"excluded": chosen} if chosen else {}), **({"excluded_not_found": unknown} if unknown else {}),
        "calibration": {"method": config.method, "samples": len(feeds), "data": origin},
        "ops": op_report(pre, target),
    }


def static_applies(bundle: Bundle, reference: ModelSpec) -> str | None:
    """Why int8-static is worth building for this bundle (convolutions, which dynamic int8 leaves in
    fp32, or a real calibration set), or None."""
    import onnx

    proto = onnx.load(str(bundle.variant_path("fp32")), load_external_data=False)
    if any(node.op_type == "Conv" for node in proto.graph.node):
        return "the model has convolutions, which only static int8 quantizes"
    if reference.calibration_data is not None:
        return "the model has a calibration set"
    return None
