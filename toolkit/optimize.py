"""Stage `optimize`: variant fp32 → variant `opt`: transformer fusions, then onnxruntime's basic
offline graph optimizations.

The fusions come from the tool that knows the graph's form: onnxscript's onnxruntime rewrites
(`optimize_for_ort`) for graphs from the dynamo exporter, which find attention (softmax of
q·kᵀ·scale plus an additive mask, times v, with or without a KV cache concatenated on axis -2)
without hints; onnxruntime's transformer optimizer for TorchScript exports whose manifest carries
fusion hints (it matches that exporter's patterns and needs the model type, heads and hidden size).

Only the basic level is applied offline: extended and full-level rewrites are specific to the
execution provider they were made for, and onnxruntime applies them anyway when a session loads
the model. Parity of the result is checked like any variant's, which catches a fusion that changes
the math.

Shape glue the exporter writes around recurrent layers, which onnxruntime keeps because its dims
are dynamic, is removed where it provably does nothing (toolkit.simplify).

The variant is made for one provider. For the CPU, SkipLayerNormalization is split back into Add +
LayerNormalization: onnxruntime's CPU kernel for it is slower than the two (benchmarks/layernorm.py),
while CUDA's fused kernel is the faster one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolkit.bundle import Bundle
from toolkit.errors import ToolkitError
from toolkit.simplify import simplify

__all__ = ["optimize"]


def optimize(path: str | Path, *, source: str = "fp32", name: str = "opt", provider: str = "cpu",
             progress: Callable[[str], None] | None = None) -> Bundle:
    """Adds variant `name` optimized from variant `source` for `provider` ("cpu" or "cuda"); returns
    the bundle (parity not yet checked)."""
    import onnx
    import onnxruntime as ort

    from toolkit.runtime import PROVIDERS

    if provider not in PROVIDERS:
        raise ToolkitError(f"unknown provider {provider!r} to optimize for; choose {', '.join(PROVIDERS)}.")
    say = progress or (lambda _msg: None)
    bundle = Bundle.open(path)
    model_file = bundle.variant_path(source)
    options: dict[str, Any] = {"provider": provider, "graph_optimization_level": "basic"}
    with tempfile.TemporaryDirectory(prefix="toolkit-optimize-") as tmp:
        current = model_file
        hints = bundle.manifest.fusion
        options["fusion"] = None
        if _exporter(bundle, source) == "dynamo" and _has_onnxscript():
            say("fusing with onnxscript's onnxruntime rewrites (attention, layer norms, GELU)")
            current, fused = _fuse_dynamo(current, Path(tmp) / "fused.onnx")
            if fused:
                options["fusion"] = {"engine": "onnxscript", "fused": fused}
        elif hints:
            say(f"fusing with onnxruntime's transformer optimizer (model type {hints['model_type']})")
            current, fused = _fuse(current, hints, Path(tmp) / "fused.onnx")
            options["fusion"] = {"engine": "onnxruntime.transformers", "model_type": hints["model_type"], "fused": fused}
        if options["fusion"] is None:
            say(f"no transformer fusion applies to {bundle.manifest.name}: generic graph optimizations only")
        say("applying onnxruntime's basic graph optimizations offline")
        optimized = Path(tmp) / "optimized.onnx"
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        session_options.optimized_model_filepath = str(optimized)
        try:
            ort.InferenceSession(str(current), sess_options=session_options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ToolkitError(f"onnxruntime cannot optimize {model_file}: {exc}") from exc
        proto = onnx.load(str(optimized))
        options["simplified"] = simplify(proto)
        if any(options["simplified"].values()):
            say("removed shape glue: " + ", ".join(f"{n} {what}" for what, n in options["simplified"].items() if n))
        if provider == "cpu":
            options["split"] = {"SkipLayerNormalization": split_skip_layer_norm(proto)}
            if options["split"]["SkipLayerNormalization"]:
                say(f"split {options['split']['SkipLayerNormalization']} SkipLayerNormalization into Add + LayerNormalization for the CPU")
        options["nodes"] = {"before": _count(onnx.load(str(model_file), load_external_data=False)), "after": _count(proto)}
        from toolkit._onnx import save_model

        save_model(proto, optimized)
        bundle.add_variant(name, optimized, recipe={"stage": "optimize", "options": options, "parent": source}, precision=bundle.variant(source).precision)
    say(f"added variant {name}: {options['nodes']['before']} → {options['nodes']['after']} nodes")
    for part in bundle.parts():
        say(f"optimizing part {part.path.name}")
        optimize(part.path, source=source, name=name, provider=provider, progress=progress)
    return bundle


def split_skip_layer_norm(proto: Any) -> int:
    """Replaces each SkipLayerNormalization whose mean and inverse-deviation outputs are unused by
    Add(input, skip) [+ bias] and LayerNormalization over the last axis, in place; returns how many.
    The sum output, where the graph reads it, keeps its name."""
    from onnx import helper

    from toolkit._onnx import default_opset

    if default_opset(proto) < 17:
        return 0  # LayerNormalization is an ONNX op from opset 17
    graph = proto.graph
    read = ({name for node in graph.node for name in node.input} | {o.name for o in graph.output}) - {""}
    nodes, split = [], 0
    for node in graph.node:
        outputs = [*node.output, "", "", ""][:4]
        if node.op_type != "SkipLayerNormalization" or node.domain != "com.microsoft" or read & set(outputs[1:3]):
            nodes.append(node)
            continue
        x, skip, gamma, beta, bias = [*node.input, "", "", ""][:5]
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)  # the contrib op's default
        stem = node.name or outputs[0]
        total = outputs[3] if outputs[3] in read else f"{stem}_sum"
        partial = f"{stem}_skip_sum" if bias else total
        nodes.append(helper.make_node("Add", [x, skip], [partial], name=f"{stem}_add"))
        if bias:
            nodes.append(helper.make_node("Add", [partial, bias], [total], name=f"{stem}_add_bias"))
        nodes.append(helper.make_node("LayerNormalization", [total, gamma, *([beta] if beta else [])], [outputs[0]],
                                      name=f"{stem}_layer_norm", axis=-1, epsilon=epsilon))
        split += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return split


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


def _fuse_dynamo(model_file: Path, target: Path) -> tuple[Path, dict[str, int]]:
    """onnxscript's rewrites; returns the file and the count of each onnxruntime op they introduced."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    try:
        model, _ = optimize_for_ort(ir.load(model_file))
    except Exception as exc:
        raise ToolkitError(f"onnxscript's onnxruntime fusions failed on {model_file}: {type(exc).__name__}: {exc}") from exc
    ir.save(model, target)
    fused = Counter(node.op_type for node in model.graph.all_nodes() if node.domain == "com.microsoft")
    return target, dict(sorted(fused.items()))


def _fuse(model_file: Path, hints: dict[str, Any], target: Path) -> tuple[Path, dict[str, int]]:
    from onnxruntime.transformers.optimizer import optimize_model

    logger = logging.getLogger("onnxruntime.transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints shape-inference failures
            model = optimize_model(
                str(model_file), model_type=hints["model_type"], num_heads=hints.get("num_heads", 0),
                hidden_size=hints.get("hidden_size", 0), opt_level=0,
            )
    except Exception as exc:
        raise ToolkitError(f"onnxruntime's transformer optimizer failed on {model_file} ({hints['model_type']}): {exc}") from exc
    finally:
        logger.setLevel(level)
    model.save_model_to_file(str(target))
    return target, {op: n for op, n in model.get_fused_operator_statistics().items() if n}


def _count(proto: Any) -> int:
    return sum(Counter(n.op_type for n in proto.graph.node).values())
