"""Stage `optimize`: variant fp32 → variant `opt`, made for one execution provider: transformer
fusions (toolkit.compile.passes.fusion), onnxruntime's basic offline graph optimizations, then the
provider's pass list (toolkit.compile.passes).

Only the basic level is applied offline: extended and full-level rewrites are specific to the
execution provider they were made for, and onnxruntime applies them anyway when a session loads
the model. Parity of the result is checked like any variant's, which catches a fusion that changes
the math.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolkit.bundle import Bundle
from toolkit.compile.passes import run_passes
from toolkit.compile.passes.fusion import fuse
from toolkit.errors import ToolkitError
from toolkit.runtime.session import PROVIDERS

__all__ = ["optimize"]


def optimize(bundle: str | Path | Bundle, *, source: str = "fp32", name: str = "opt", provider: str = "cpu",
             progress: Callable[[str], None] | None = None) -> Bundle:
    """Adds variant `name` optimized from variant `source` for `provider` ("cpu" or "cuda"), in the
    bundle and in each of its parts (the parts first: the bundle lists the variant only once every
    graph it needs is in place); returns the bundle (parity not yet checked)."""
    import onnx

    from toolkit._onnx import save_model

    if provider not in PROVIDERS:
        raise ToolkitError(f"unknown provider {provider!r} to optimize for; choose {', '.join(PROVIDERS)}.")
    say = progress or (lambda _msg: None)
    bundle = Bundle.of(bundle)
    for part in bundle.parts():
        say(f"optimizing part {part.path.name}")
        optimize(part, source=source, name=name, provider=provider, progress=progress)
    model_file = bundle.variant_path(source)
    options: dict[str, Any] = {"provider": provider, "graph_optimization_level": "basic"}
    with tempfile.TemporaryDirectory(prefix="toolkit-optimize-") as tmp:
        say("fusing transformer blocks (attention, layer norms, GELU) where the graph has them")
        current, options["fusion"] = fuse(bundle, source, model_file, Path(tmp) / "fused.onnx")
        if options["fusion"] is None:
            say(f"no transformer fusion applies to {bundle.manifest.name}: generic graph optimizations only")
        say("applying onnxruntime's basic graph optimizations offline")
        try:
            proto = _basic_optimizations(current, Path(tmp) / "optimized.onnx")
        except ToolkitError as exc:
            if options["fusion"] is None:
                raise
            # A fusion that onnxruntime cannot load is the rewrite's bug: `opt` goes on without it, saying why.
            say(f"the fused graph does not load in onnxruntime, optimizing without fusion: {exc}")
            options["fusion"] = {"skipped": str(exc)}
            proto = _basic_optimizations(model_file, Path(tmp) / "optimized.onnx")
        options["passes"] = run_passes(proto, provider)
        if any(options["passes"].values()):
            say("rewrites for " + provider + ": " + ", ".join(f"{what} {n}" for what, n in options["passes"].items() if n))
        options["nodes"] = {"before": _count(onnx.load(str(model_file), load_external_data=False)), "after": _count(proto)}
        optimized = Path(tmp) / "opt.onnx"
        save_model(proto, optimized)
        bundle.add_variant(name, optimized, recipe={"stage": "optimize", "options": options, "parent": source},
                           precision=bundle.variant(source).precision)
    say(f"added variant {name}: {options['nodes']['before']} → {options['nodes']['after']} nodes")
    return bundle


def _basic_optimizations(model_file: Path, target: Path) -> Any:
    import onnx
    import onnxruntime as ort

    from toolkit._onnx import is_large

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    if is_large(model_file):  # past protobuf's 2 GiB, onnxruntime can only write the weights beside the graph
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{target.name}.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(model_file), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ToolkitError(f"onnxruntime cannot optimize {model_file}: {exc}") from exc
    return onnx.load(str(target))


def _count(proto: Any) -> int:
    return sum(Counter(n.op_type for n in proto.graph.node).values())
