"""`toolkit inspect`: what a bundle holds: manifest, per-variant op histogram, sizes, parity status."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from toolkit.bundle import Bundle
from toolkit.errors import ToolkitError
from toolkit.runtime.session import cuda_status

__all__ = ["describe", "missed_gates"]


def describe(path: str | Path) -> dict[str, Any]:
    bundle = Bundle.open(path)
    manifest = bundle.manifest.to_json()
    variants = {}
    for name, variant in bundle.manifest.variants.items():
        sealed = (bundle.manifest.encryption or {}).get("files", {})
        try:
            for file in [variant.file, *(e["file"] for e in variant.external_data)] if sealed else []:
                bundle.verify_file(file, sealed[file]["sha256"], "a sealed file")
            if not sealed:
                bundle.variant_path(name)
            integrity = "ok"
        except ToolkitError as exc:
            integrity = str(exc)
        info: dict[str, Any] = {
            "file": variant.file,
            "bytes": variant.bytes,
            "precision": variant.precision,
            "recipe": variant.recipe,
            "integrity": integrity,
            "parity": _parity_summary(variant.parity),
        }
        if integrity == "ok" and not sealed:  # a sealed graph's ops are for its key holders to see
            info.update(_graph_summary(bundle.path / variant.file))
        variants[name] = info
    cuda_ok, why = cuda_status()
    return {
        **{k: manifest[k] for k in ("name", "description", "task", "source", "opset", "inputs", "outputs", "dims", "versions")},
        "path": str(bundle.path),
        "parts": {part: str(bundle.path / part) for part in bundle.manifest.parts},
        "variants": variants,
        "failed": dict(bundle.manifest.failed),  # variants a build could not make, and why
        "best": bundle.manifest.best,
        "providers": {"cpu": "available", "cuda": "available" if cuda_ok else f"unavailable: {why}"},
    }


def _parity_summary(parity: dict[str, Any] | None) -> str:
    if parity is None:
        return "not checked (run `toolkit check`)"
    if "failed" in parity:  # it could not be checked at all
        return f"FAILED: {parity['failed']}"
    verdict = "passed" if parity["passed"] else "FAILED"
    return f"{verdict} on {parity['runtime']} at {parity['checked_at']}" + ("" if parity["passed"] else f": {missed_gates(parity)}")


def missed_gates(parity: dict[str, Any]) -> str:
    """The gates a variant missed, in a line."""
    reasons = list(parity.get("errors") or [])[:2]
    reasons += [f"output {name}: max error {o['max_abs_err']:.3g} at a scale of {o['scale']:.3g}"
                for name, o in (parity.get("outputs") or {}).items() if not o.get("passed", True)][:2]
    metric = parity.get("task_metric") or {}
    if metric and not metric.get("passed", True):
        reasons.append(f"{metric['metric']} {metric['value']:.4g} against a threshold of {metric['threshold']}")
    accuracy = parity.get("accuracy") or {}
    if accuracy and not accuracy.get("passed", True):
        reasons.append(f"accuracy {accuracy['variant']:.2%} against the reference's {accuracy['reference']:.2%}")
    parts = [name for name, part in (parity.get("parts") or {}).items() if not part.get("passed", True)]
    if parts:
        reasons.append(f"its part {', '.join(parts)} fails its gates (`toolkit inspect DIR/{parts[0]}`)")
    return "; ".join(reasons) or "see `toolkit check`"


def _graph_summary(path: Path) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops: Counter[str] = Counter()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            ops[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    visit(sub)

    visit(model.graph)
    for function in model.functions:
        for node in function.node:
            ops[node.op_type] += 1
    return {
        "ir_version": model.ir_version,
        "opsets": {imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
        "nodes": sum(ops.values()),
        "parameters": sum(int(_numel(t.dims)) for t in model.graph.initializer),
        "ops": dict(ops.most_common()),
    }


def _numel(dims: Any) -> int:
    n = 1
    for d in dims:
        n *= d
    return n
