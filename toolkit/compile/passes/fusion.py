"""Transformer fusions, from the tool that knows the graph's form: onnxscript's onnxruntime rewrites
(`optimize_for_ort`) for graphs from the dynamo exporter, which find attention (softmax of
q·kᵀ·scale plus an additive mask, times v, with or without a KV cache concatenated on axis -2)
without hints; onnxruntime's transformer optimizer for TorchScript exports whose manifest carries
fusion hints (it matches that exporter's patterns and needs the model type, heads and hidden size)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit._onnx import is_large
from toolkit.bundle import Bundle
from toolkit.compile._child import ChildFailed, run_child
from toolkit.errors import ToolkitError

__all__ = ["fuse"]


def fuse(bundle: Bundle, source: str, model_file: Path, target: Path) -> tuple[Path, dict[str, Any] | None]:
    """Fuses `model_file` (variant `source` of `bundle`) into `target` with the engine that fits it;
    returns the file to go on with and what was fused (None: no fusion applies)."""
    hints = bundle.manifest.fusion
    if _exporter(bundle, source) == "dynamo" and _has_onnxscript():
        fused, prepared = _fuse_dynamo(model_file, target)
        if not fused:
            return target, None
        repaired = _repair(target)
        return target, {"engine": "onnxscript", "fused": fused, **({"prepared": prepared} if prepared else {}),
                        **({"repaired": repaired} if repaired else {})}
    if hints:
        fused = _fuse_hinted(model_file, hints, target)
        return target, {"engine": "onnxruntime.transformers", "model_type": hints["model_type"], "fused": fused}
    return model_file, None


def _repair(model_file: Path) -> dict[str, int]:
    """Rules that mend what a fusion leaves behind (toolkit.compile.passes.attention_gemm), in place."""
    import onnx

    from toolkit._onnx import save_model
    from toolkit.compile.passes.attention_gemm import gemms_after_attention_to_matmul

    proto = onnx.load(str(model_file))
    counts = {"Gemm after attention to MatMul": gemms_after_attention_to_matmul(proto)}
    if any(counts.values()):
        save_model(proto, model_file)
    return {k: v for k, v in counts.items() if v}


def _exporter(bundle: Bundle, variant: str) -> str | None:
    """The exporter that wrote the graph `variant` descends from."""
    while True:
        recipe = bundle.variant(variant).recipe
        if recipe.get("stage") == "export" or not recipe.get("parent"):
            return recipe.get("options", {}).get("exporter")
        variant = recipe["parent"]


def _has_onnxscript() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxscript") is not None


_DYNAMO = """
from collections import Counter

def main(model_file, target, external):
    import os

    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    from toolkit.compile.passes.before_fusion import prepare

    model = ir.load(model_file)
    prepared = prepare(model)
    model, _ = optimize_for_ort(model)
    fused = Counter(n.op_type for n in model.graph.all_nodes() if n.domain == "com.microsoft")
    if external:
        ir.save(model, target, external_data=os.path.basename(target) + ".data")
    else:
        # written with its weights beside it first: onnx_ir writes each weight from its own memory,
        # where a proto of the whole model and then its bytes would be made (the model held 3 times);
        # then read back and written whole a weight at a time
        import onnx

        from toolkit._onnx import save_model

        staged = os.path.basename(target) + ".staged.data"
        ir.save(model, target, external_data=staged)
        del model
        save_model(onnx.load(target), target)
        os.remove(os.path.join(os.path.dirname(target), staged))
    return dict(sorted(fused.items())), {k: v for k, v in prepared.items() if v}
"""


def _fuse_dynamo(model_file: Path, target: Path) -> tuple[dict[str, int], dict[str, int]]:
    """onnxscript's rewrites after toolkit's own (toolkit.compile.passes.before_fusion); returns the
    count of each onnxruntime op they introduced and of each rewrite of ours that applied. In a child
    process: the rewrites hold the model several times over, and the memory they leave fragmented
    would stay with the build to its end."""
    try:
        fused, prepared = run_child(_DYNAMO, str(model_file.resolve()), str(target.resolve()), is_large(model_file), cwd=target.parent)
    except ChildFailed as exc:
        raise ToolkitError(f"onnxscript's onnxruntime fusions failed on {model_file}: {exc}") from exc
    return fused, prepared


_HINTED = """
import contextlib, io, logging

def main(model_file, model_type, num_heads, hidden_size, target, external):
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)  # it logs every pattern it tries
    with contextlib.redirect_stdout(io.StringIO()):  # and prints shape-inference failures
        model = optimize_model(model_file, model_type=model_type, num_heads=num_heads, hidden_size=hidden_size, opt_level=0)
    model.save_model_to_file(target, use_external_data_format=external)
    return {op: n for op, n in model.get_fused_operator_statistics().items() if n}
"""


def _fuse_hinted(model_file: Path, hints: dict[str, Any], target: Path) -> dict[str, int]:
    """onnxruntime's transformer optimizer, in a child process working beside `target` (it dumps a
    failed shape inference into its working directory)."""
    try:
        return run_child(_HINTED, str(model_file.resolve()), hints["model_type"], hints.get("num_heads", 0), hints.get("hidden_size", 0),
                         str(target.resolve()), is_large(model_file), cwd=target.parent)
    except ChildFailed as exc:
        raise ToolkitError(f"onnxruntime's transformer optimizer failed on {model_file} ({hints['model_type']}): {exc}") from exc
