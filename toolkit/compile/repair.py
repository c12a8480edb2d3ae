"""Repairing a variant that fails its gates: `toolkit build` does it for fp16, int8 and int8-static
within a time budget, and `repair(DIR, VARIANT)` does it on a bundle.

1. toolkit.compile.localize runs the failing variant beside fp32 on held-out inputs once; what it
   finds picks the attempts, so that a variant no attempt can fix costs few.
2. int8-static: another calibration, only where localize saw a range problem it could fix: a
   tensor past its calibrated range (a clipping method's range was too narrow: minmax), an outlier
   channel or tail that a min-max range spends int8's levels on (percentile), a weighted node whose
   weights share one scale (per channel).
3. Then the nodes to keep in fp32, ranked by how many times their node multiplied the error it
   received, so that where an error is made ranks above where it is only carried. The variant is made
   again keeping the first one, then the most it may keep: if that fails too the variant is bound to
   fail and the search stops; else the smallest passing count between them is found by bisection.
   int8 keeps at most half as many nodes as the graph has weighted ones: past that, its quantize and
   dequantize steps cost more than its int8 products save, and the variant is bound to lose to fp32.
   fp16 starts from no op type kept in fp32 (the fixed list it was first made with keeps every
   normalisation, softmax and reduction), so that only the nodes this model needs stay in fp32.
4. An int8-static that none of that repairs is measured for what binds it: made again with its
   weights at 16 bits, then its activations, each judged by the gates (`_what_binds`): whether
   its 8-bit activations, its 8-bit weights, or only the two together miss them.

Every attempt (its settings and why they were tried, the nodes kept, the gate it missed, its
seconds) is recorded in the variant's recipe under `repair`, with each kept node's module and the
value range that explains it; a variant no attempt repairs within the budget stays failed, as its
last attempt made it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from toolkit.bundle import Bundle
from toolkit.compile.localize import Localization, TensorError, growth, localize, module_path
from toolkit.compile.quantization import DYNAMIC_OPS, quantize
from toolkit.errors import ToolkitError
from toolkit.spec import ModelSpec

__all__ = ["DEFAULT_BUDGET", "REPAIRABLE", "repair"]

DEFAULT_BUDGET = 300.0  # seconds for all of a build's repairs: a few re-quantizations and checks of a mid-size model on 2 cores
REPAIRABLE = ("fp16", "int8", "int8-static")
_WEIGHTED = (*DYNAMIC_OPS, "Conv", "ConvTranspose")  # the ops whose weights int8 quantizes
_BISECT_BYTES = 1 << 30  # larger variants are localized one exposed tensor at a time


def repair(bundle: str | Path | Bundle, variant: str, *, budget: float = DEFAULT_BUDGET, provider: str = "cpu",
           reference: ModelSpec | None = None, progress: Callable[[str], None] | None = None,
           evidence: dict[Any, Any] | None = None, scratch: Path | None = None, trust_source: bool = False) -> dict[str, Any]:
    """Makes `variant` again until it passes its gates or `budget` seconds are spent; returns the
    repair record (also stored in the variant's recipe, under options.repair). `scratch` as for
    quantize (a directory of its own otherwise: the attempts share one pre-processing and
    calibration). `trust_source` vouches for the code the manifest's source names (see `bundle_reference`)."""
    if scratch is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="toolkit-repair-") as own:
            return repair(bundle, variant, budget=budget, provider=provider, reference=reference, progress=progress,
                          evidence=evidence, scratch=Path(own), trust_source=trust_source)
    from toolkit.compile.parity import check
    from toolkit.reference.source import bundle_reference

    say = progress or (lambda _msg: None)
    bundle = Bundle.of(bundle, trust_source=trust_source)
    recipe = bundle.variant(variant).recipe
    mode = recipe.get("options", {}).get("mode")
    if mode not in REPAIRABLE:
        raise ToolkitError(f"variant {variant!r} was not made by quantize (its recipe: {recipe.get('stage')}); "
                           f"repair remakes {', '.join(REPAIRABLE)}.")
    if reference is None:
        say(f"building the PyTorch reference ({bundle.manifest.source.describe()})")
        reference = bundle_reference(bundle)
    evidence = {} if evidence is None else evidence
    started = time.monotonic()
    attempts: list[dict[str, Any]] = []
    source = recipe["parent"]

    def attempt(options: dict[str, Any], kept: list[TensorError], why: str = "") -> bool:
        from toolkit.runtime.describe import missed_gates

        began = time.monotonic()
        settings = {**options, **({"keep_nodes" if mode == "fp16" else "exclude": tuple(e.tensor for e in kept)} if kept else {})}
        say(f"repairing {variant}: {_describe(settings, kept)}" + (f" ({why})" if why else ""))
        try:
            quantize(bundle, mode=mode, source=source, reference=reference, progress=say, scratch=scratch, **settings)
            record = check(bundle, variants=[variant], provider=provider, reference=reference, progress=say, evidence=evidence)[variant]
            passed, gate = bool(record["passed"]), "passed" if record["passed"] else missed_gates(record)
        except ToolkitError as exc:
            passed, gate = False, f"could not be made: {exc}"
        attempts.append({"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
                         "kept": [e.tensor for e in kept], **({"why": why} if why else {}), "passed": passed, "gate": gate,
                         "seconds": round(time.monotonic() - began, 1)})
        return passed

    def time_left() -> bool:
        spent = time.monotonic() - started
        return spent + (attempts[-1]["seconds"] if attempts else 0.0) <= budget

    base = _base_options(mode, recipe["options"])
    passed, kept, note = False, [], ""
    if mode == "fp16" and time_left():
        base = {**base, "keep_fp32": ()}
        passed = attempt(base, [], "no op type kept in fp32: only the nodes this model needs will be")
    if not passed and time_left():
        found = _localize(bundle, variant, provider, reference, say)
        if mode == "int8-static":
            for change, why in _calibrations(found, base, bundle):
                if time_left() and attempt({**base, **change}, [], why):
                    passed, base = True, {**base, **change}
                    break
        if not passed and time_left():
            passed, kept, note = _keep_nodes(found, mode, bundle, source, lambda k: attempt(base, k), time_left, say)
    binds = None
    if not passed and mode == "int8-static" and time_left():
        binds = _what_binds(bundle, variant, source, base, provider, reference, evidence, scratch, say)
    result = {"passed": passed, "kept": [_why(e) for e in kept], "attempts": attempts,
              "seconds": round(time.monotonic() - started, 1), "budget": budget, **({"note": note} if note else {}),
              **({"binds": binds} if binds else {})}
    if mode == "fp16":
        result["fixed_list_nodes"] = _nodes_of(bundle, source, recipe["options"].get("kept_fp32", []))  # what the fixed op-type list kept
    bundle.update(lambda manifest: manifest.variants[variant].recipe.setdefault("options", {}).__setitem__("repair", result))
    say(f"{variant} {'repaired' if passed else 'not repaired'} in {result['seconds']:.0f} s after {len(attempts)} attempts"
        + (f", {len(kept)} nodes kept in fp32" if passed else ""))
    return result


def _what_binds(bundle: Bundle, variant: str, source: str, base: dict[str, Any], provider: str, reference: ModelSpec,
                evidence: dict[Any, Any], scratch: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Whether a failing int8-static is bound by its 8-bit activations, its 8-bit weights or only
    their sum: the variant made again with one side at 16 bits, then the other, each judged by the
    variant's gates, in a copy of the bundle that the user never sees."""
    import shutil

    from toolkit.compile.parity import check
    from toolkit.runtime.describe import missed_gates

    copy = scratch / f"binds-{variant}"
    shutil.rmtree(copy, ignore_errors=True)
    # the bundle with only the variant's source graph, so that the copy costs one graph
    others = {f for name, v in bundle.manifest.variants.items() if name != source for f in (v.file, *(e["file"] for e in v.external_data))}
    shutil.copytree(bundle.path, copy, ignore=lambda _directory, names: [n for n in names if n in others])
    copy_bundle = Bundle.of(copy, trust_source=True)
    copy_bundle.update(lambda manifest: [manifest.variants.pop(name) for name in list(manifest.variants) if name != source])
    sides = {}
    try:
        for side, wide in (("activations", {"weight_bits": 16}), ("weights", {"activation_bits": 16})):
            say(f"measuring what binds {variant}: its 8-bit {side} alone, the other side at 16 bits")
            quantize(copy_bundle, mode="int8-static", source=source, reference=reference, progress=say, scratch=scratch, **base, **wide)
            record = check(copy_bundle, variants=[variant], provider=provider, reference=reference, progress=say, evidence=evidence)[variant]
            metric = record.get("task_metric") or {}
            sides[side] = {"passed": bool(record["passed"]), "gate": "passed" if record["passed"] else missed_gates(record),
                           **({"metric": metric["metric"], "value": metric["value"]} if metric else {})}
    except ToolkitError as exc:  # a diagnosis: its failure must not fail the repair
        say(f"could not measure what binds {variant}: {exc}")
        return {}
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    return {**sides, "verdict": _verdict(sides)}


def _verdict(sides: dict[str, dict[str, Any]]) -> str:
    """What the two one-sided measurements say, in a sentence."""
    def shown(side: str) -> str:
        found = sides[side]
        return f"{found['metric'].replace('_', ' ')} {found['value']:.3g}" if "metric" in found else found["gate"]

    failing = [side for side in ("activations", "weights") if not sides[side]["passed"]]
    if len(failing) == 2:
        return (f"each side alone misses the gates at 8 bits (8-bit activations with 16-bit weights: {shown('activations')}; "
                f"8-bit weights with 16-bit activations: {shown('weights')}): int8 cannot pass without keeping layers in float")
    if failing:
        other = "weights" if failing[0] == "activations" else "activations"
        return (f"its 8-bit {failing[0]} bind: with 16-bit {other} it still misses the gates ({shown(failing[0])}); "
                f"with 16-bit {failing[0]} it passes ({shown(other)})")
    return (f"each side alone passes at 8 bits (8-bit activations: {shown('activations')}; 8-bit weights: {shown('weights')}): "
            "only their errors together miss the gates")


def _keep_nodes(found: Localization, mode: str, bundle: Bundle, source: str, attempt: Callable[[list[TensorError]], bool],
                time_left: Callable[[], bool], say: Callable[[str], None]) -> tuple[bool, list[TensorError], str]:
    """The fewest of localize's ranked nodes to keep in fp32 for the variant to pass (see the module's
    docstring), and a note where none could be found."""
    ranked = _ranked(found, mode, bundle)
    if mode != "fp16":
        # keeping more than half the weighted nodes in fp32 leaves a variant that pays for its
        # quantize and dequantize steps without the int8 products that would make up for them
        ranked = ranked[: max(1, _nodes_of(bundle, source, _WEIGHTED) // 2)]
    say(f"repairing {found.variant}: {len(ranked)} candidate nodes to keep in fp32, where the error is made first")
    if not ranked:
        return False, [], f"no node to keep in fp32: localize found no tensor of {found.variant} past a tenth of rel {found.tolerance:g} on {found.inputs}"
    made: list[int] = []

    def passes(k: int) -> bool:
        made.append(k)
        return attempt(ranked[:k])

    passed, count, bound = _search(len(ranked), passes, time_left)
    if passed and made[-1] != count:
        attempt(ranked[:count])  # the variant as the smallest passing set makes it
    note = f"bound to fail: keeping all {len(ranked)} candidate nodes in fp32 (the most it may keep) missed its gates too" if bound else ""
    return passed, ranked[:count], note


def _search(n: int, passes: Callable[[int], bool], time_left: Callable[[], bool]) -> tuple[bool, int, bool]:
    """The smallest k ≤ n that passes, and whether the search found none can: k = 1 first (one node is
    often the fault), then n (if that fails, no k can: the search stops), then bisection between."""
    if not n or not time_left():
        return False, 0, False
    if passes(1):
        return True, 1, False
    if n == 1:
        return False, 0, True
    if not time_left():
        return False, 0, False
    if not passes(n):
        return False, 0, True
    low, high = 2, n  # k = high passes, every k below low fails
    while low < high and time_left():
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle + 1
    return True, high, False


def _calibrations(found: Localization, base: dict[str, Any], bundle: Bundle) -> list[tuple[dict[str, Any], str]]:
    """Other calibrations for int8-static, each where localize saw the range problem it fixes."""
    departing = [e for e in found.tensors if e.rel > found.tolerance]
    changes = []
    saturated = next((e for e in departing if e.cause.startswith("int8 saturation")), None)
    if saturated is not None and base["method"] != "minmax":
        changes.append(({"method": "minmax"}, f"{saturated.cause}: a range as wide as the calibration data's"))
    spread = next((e for e in departing if e.cause.startswith("int8 outlier")), None)
    if spread is not None and base["method"] == "minmax":
        changes.append(({"method": "percentile"}, f"{spread.cause}: a range that clips the rarest values"))
    if not base["per_channel"]:
        import onnx

        graph = onnx.load(str(bundle.variant_path(found.reference)), load_external_data=False).graph
        weighted = {o for n in graph.node if n.op_type in _WEIGHTED for o in n.output}
        hit = next((e for e in departing if e.tensor in weighted), None)
        if hit is not None:
            changes.append(({"per_channel": True}, f"{hit.tensor} ({hit.op}) departs: a weight scale per output channel"))
    return changes


def _ranked(found: Localization, mode: str, bundle: Bundle) -> list[TensorError]:
    """The candidates to keep in fp32, most error made first (ties in topological order). fp16: the
    nodes of the tensors past the tolerance. int8: the nodes its quantizer quantizes (dynamic: the
    weighted ones; static: any), each scored by the largest growth among the tensors it reads, makes,
    and its consumers make: a badly quantized input shows in what the node makes, or, in a QDQ graph,
    already in the tensor it reads (the quantizer's rounding sits before the node). Errors that reach
    a departing output through departing tensors rank above those the graph attenuates on the way."""
    import onnx

    limit = found.tolerance
    departing = {e.tensor: e for e in found.tensors if e.rel > limit}
    if not departing:  # a task gate missed with every tensor within the tolerance: where the most error is made
        limit = found.tolerance / 10
        departing = {e.tensor: e for e in found.tensors if e.rel > limit}
    score = {name: growth(e, found.tolerance) for name, e in departing.items()}
    if mode == "fp16":
        return sorted(departing.values(), key=lambda e: -score[e.tensor])
    graph = onnx.load(str(bundle.variant_path(found.reference)), load_external_data=False).graph
    unmeasured = {o for n in graph.node for o in n.output} - {e.tensor for e in found.tensors}
    reaching = _reaching_outputs(graph, set(departing), [e.tensor for e in found.outputs if e.rel > limit], unmeasured)
    for e in list(departing.values()) if mode == "int8-static" else []:
        # a tensor whose range explains an error downstream (an outlier channel that a later node reads
        # down) may itself look accurate against its own scale; QDQ rounds it where it is made, so its
        # makers are candidates too (dynamic int8 rounds only what its weighted nodes read)
        if e.culprit and score[e.tensor] > score.get(e.culprit, 0.0):
            score[e.culprit], departing[e.culprit] = score[e.tensor], e
            if e.tensor in reaching:
                reaching.add(e.culprit)
    # an error that reaches a departing output ranks first: one the graph attenuates on the way misses no gate
    rank = {name: (name in reaching, value) for name, value in score.items()}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    # dynamic int8 quantizes weighted nodes only; static (QDQ) also the activations around Add, Gather, Softmax, ...
    quantizable = [n for n in graph.node if mode == "int8-static" or n.op_type in _WEIGHTED]
    candidates = []
    for node in quantizable:
        near = [*node.input, *node.output, *(o for out in node.output for c in consumers.get(out, []) for o in c.output)]
        best = max((rank[name] for name in near if name in rank), default=None)
        if best is not None:
            error = next(departing[name] for name in near if name in rank and rank[name] == best)
            why = error.cause or f"the error reaches {error.rel:.3g} of the scale at {error.tensor}, {best[1]:.0f}× what reaches that node"
            candidates.append((best, replace(error, tensor=node.output[0], node=node.name, op=node.op_type, module=module_path(node), cause=why)))
    return [e for _, e in sorted(candidates, key=lambda c: (not c[0][0], -c[0][1]))]


def _reaching_outputs(graph: Any, departing: set[str], outputs: list[str], unmeasured: set[str] = frozenset()) -> set[str]:
    """The departing tensors from which a departing output is reached through departing tensors, or
    tensors the variant does not compute apart (a Gemm's output that a QDQ graph fuses with its Relu)."""
    producers = {o: n for n in graph.node for o in n.output}
    passable = departing | set(unmeasured)
    reached, frontier = set(), [name for name in outputs if name in departing]
    while frontier:
        name = frontier.pop()
        if name in reached:
            continue
        reached.add(name)
        node = producers.get(name)
        frontier += [i for i in (node.input if node is not None else ()) if i in passable]
    return reached & departing


def _localize(bundle: Bundle, variant: str, provider: str, reference: ModelSpec, say: Callable[[str], None]) -> Localization:
    large = bundle.variant_path(variant).stat().st_size > _BISECT_BYTES
    return localize(bundle, variant, provider=provider, mode="bisect" if large else "all", spec=reference, progress=say)


def _base_options(mode: str, options: dict[str, Any]) -> dict[str, Any]:
    """The quantize options the variant was made with, from its recipe."""
    if mode == "fp16":
        return {"io": options.get("io", "fp32"), "keep_fp32": tuple(options.get("kept_fp32", ()))}
    if mode == "int8":
        return {"per_channel": options.get("per_channel", True), "reduce_range": options.get("reduce_range"), "smooth": options.get("smooth", True)}
    calibration = options.get("calibration", {})
    return {"method": calibration.get("method", "minmax"), "per_channel": options.get("per_channel", False), "reduce_range": options.get("reduce_range"),
            "calibration_samples": calibration.get("samples", 128), "smooth": options.get("smooth", True),
            "rounding": (options.get("rounding") or {}).get("method", "gptq")}


def _describe(settings: dict[str, Any], kept: list[TensorError]) -> str:
    shown = {k: v for k, v in settings.items() if k not in ("keep_nodes", "exclude")}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) + (f"; {len(kept)} nodes kept in fp32" if kept else "")


def _why(error: TensorError) -> dict[str, Any]:
    return {"tensor": error.tensor, "node": error.node, "op": error.op, "module": error.module, "rel": error.rel,
            "why": error.cause or f"the error reaches {error.rel:.3g} of its scale here"}


def _nodes_of(bundle: Bundle, source: str, op_types: Sequence[str]) -> int:
    """How many nodes of the variant's source graph are of `op_types`."""
    import onnx

    graph = onnx.load(str(bundle.variant_path(source)), load_external_data=False).graph
    return sum(node.op_type in op_types for node in graph.node)
