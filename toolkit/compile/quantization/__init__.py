"""Stage `quantize`: an fp32 variant → `int8` (dynamic), `int8-static` (QDQ, calibrated), `fp16` or
`int4` (weight-only MatMulNBits).

Each scheme is a frozen config (configs.py) and a handler registered for it here; adding a scheme
is a new config and handler, not new branches. Every handler works in a private temporary directory
and records in the variant's recipe what it did: for int8, how many ops of each type were quantized
and how many kept float weights; for fp16, which op types were kept in fp32.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolkit._scoped import logger_level
from toolkit.bundle import Bundle
from toolkit.compile.quantization._common import QuantizeContext
from toolkit.compile.quantization.configs import (
    CALIBRATION_METHODS,
    DYNAMIC_OPS,
    FP16_IO,
    FP16_KEEP_FP32,
    FP16_KEEP_FP32_FUSED,
    MODES,
    Fp16,
    Int4,
    Int8Dynamic,
    Int8Static,
    QuantConfig,
    config_for,
)
from toolkit.compile.quantization.fp16 import quantize_fp16
from toolkit.compile.quantization.int4 import int4_applies, quantize_int4
from toolkit.compile.quantization.int8_dynamic import quantize_int8_dynamic
from toolkit.compile.quantization.int8_static import quantize_int8_static, static_applies
from toolkit.errors import ToolkitError
from toolkit.spec import ModelSpec

__all__ = ["CALIBRATION_METHODS", "DYNAMIC_OPS", "FP16_IO", "FP16_KEEP_FP32", "FP16_KEEP_FP32_FUSED", "MODES", "Fp16", "Int4", "Int8Dynamic", "Int8Static", "QuantConfig",
           "QuantizeContext", "config_for", "int4_applies", "quantize", "static_applies"]

Handler = Callable[[QuantizeContext, Any, Path, Path], dict[str, Any]]
HANDLERS: dict[type, Handler] = {Int8Dynamic: quantize_int8_dynamic, Int8Static: quantize_int8_static, Fp16: quantize_fp16,
                                 Int4: quantize_int4}


def _io_changes(bundle: Bundle, model_file: Path) -> dict[str, str]:
    """{name: dtype} of the graph's inputs and outputs whose dtype differs from the manifest's."""
    import onnx

    from toolkit._onnx import value_dtype

    graph = onnx.load(str(model_file), load_external_data=False).graph
    declared = {t.name: t.dtype for t in (*bundle.manifest.inputs, *bundle.manifest.outputs)}
    return {v.name: value_dtype(v) for v in (*graph.input, *graph.output) if v.name in declared and value_dtype(v) != declared[v.name]}


def _refuse_unchanged(config: QuantConfig, source: str, ops: dict[str, dict[str, int]]) -> None:
    """A quantization that quantized no weight would be fp32 under an int8 name, and could pass its
    gates and become best as such: refused, saying what the model has and what would quantize it."""
    if any(r["quantized"] for r in ops.values()):
        return
    found = ", ".join(f"{op} 0/{r['with_weights']}" for op, r in ops.items()) or "no weights the quantizer reads"
    hint = " Convolutions are quantized by calibrated int8: --mode int8-static." if "Conv" in ops and config.mode == "int8" else ""
    raise ToolkitError(f"{config.mode} from variant {source!r} quantized no weights ({found}): the variant would be {source} "
                       f"under another name, so none is made.{hint}")


def quantize(
    bundle: str | Path | Bundle,
    *,
    mode: str | None = None,
    config: QuantConfig | None = None,
    source: str = "fp32",
    reference: ModelSpec | None = None,
    progress: Callable[[str], None] | None = None,
    scratch: Path | None = None,
    trust_source: bool = False,
    **options: Any,
) -> Bundle:
    """Adds the variant named after the scheme (`config`, or `mode` with the scheme's `options`:
    see configs.py), quantized from variant `source`, in the bundle and in each of its parts; returns
    the bundle (parity not yet checked). `reference` is the model's PyTorch reference, if the caller
    has it built already (calibration data comes from it); `scratch`, a directory the caller keeps
    between quantizations of one build, where work they share is kept (pre-processed models).
    `trust_source` vouches for the code the manifest's source names (see `bundle_reference`). Parts are quantized first: the bundle lists the
    variant only once every graph it needs is in place."""
    if config is None:
        if mode is None:
            raise ToolkitError(f"give a quantization mode ({', '.join(MODES)}) or a config.")
        config = config_for(mode, options)
    elif mode is not None or options:
        raise ToolkitError("give either a config or a mode with its options, not both.")
    say = progress or (lambda _msg: None)
    bundle = Bundle.of(bundle, trust_source=trust_source)
    if bundle.variant(source).precision != "fp32":
        raise ToolkitError(f"variant {source!r} is {bundle.variant(source).precision}; quantize from an fp32 variant.")
    for part in bundle.parts():
        say(f"quantizing part {part.path.name}")
        quantize(part, config=config, source=source, progress=progress, scratch=scratch)
    model_file = bundle.variant_path(source)
    with tempfile.TemporaryDirectory(prefix="toolkit-quantize-") as tmp, logger_level(None, logging.ERROR):
        # (the quantizer logs every node it skips at INFO/WARNING)
        context = QuantizeContext(bundle, Path(tmp), say, reference, scratch=scratch)
        out = Path(tmp) / "quantized.onnx"
        try:
            options = HANDLERS[type(config)](context, config, model_file, out)
        except ToolkitError:
            raise
        except Exception as exc:  # onnxruntime's and onnxconverter's tools fail with their own exception types
            raise ToolkitError(f"{config.mode} from variant {source!r}: the quantizer failed with {type(exc).__name__}: {exc}") from exc
        if "ops" in options:
            say("weights quantized per op type: " + ", ".join(f"{op} {r['quantized']}/{r['with_weights']}" for op, r in options["ops"].items()))
            _refuse_unchanged(config, source, options["ops"])
        import onnx

        from toolkit._onnx import save_model

        save_model(onnx.load(str(out)), out)
        bundle.add_variant(config.mode, out, recipe={"stage": "quantize", "options": {"mode": config.mode, **options}, "parent": source},
                           precision=config.precision, io=_io_changes(bundle, out))
    say(f"added variant {config.mode} ({bundle.manifest.variants[config.mode].bytes / 1e6:.2f} MB, from {bundle.variant(source).bytes / 1e6:.2f} MB)")
    return bundle
