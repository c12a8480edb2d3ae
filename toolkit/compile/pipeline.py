"""`toolkit build`: export + optimize + quantize + check in one go, then the choice of `best`.

`best` is the fastest variant that passed its gates, measured briefly on this machine: each passing
variant runs beside fp32 in interleaved rounds at batch 1 and 32 (seq 32 for sequence models; a
decoder's 32-token prompt and its one-token steps over a 32-token cache), and the winner is the one
with the lowest geometric mean of p50 latency relative to fp32 among those that are nowhere slower
than fp32 (beyond a 5% noise margin). The measurements and the rule are recorded in the manifest,
and `toolkit.load(..., variant="best")` refuses a `best` whose variant has not passed its gates.

A build holds one PyTorch reference and one variant's session at a time, and hands freed memory
back between stages (toolkit.compile._memory); once the first check has the reference's outputs,
the reference's weights are mapped from a file rather than held (`_map_weights`).
"""

from __future__ import annotations

import datetime
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.bundle import Bundle
from toolkit.compile._memory import release_memory
from toolkit.compile.repair import DEFAULT_BUDGET
from toolkit.errors import CheckFailed, ToolkitError
from toolkit.spec import ModelSpec

__all__ = ["BEST_RULE", "BuildContext", "build", "choose_best", "select_best", "timed_variants"]

# Two measurements of one model on a shared machine differ by a few percent; a variant within this
# margin of fp32 at some shape counts as no slower there.
NOISE_MARGIN = 0.05
BEST_RULE = (
    "lowest geometric mean of p50 latency relative to fp32 over the measured shapes, among variants that "
    f"passed their gates and are nowhere slower than fp32 by more than the {NOISE_MARGIN:.0%} noise margin; "
    "a variant of lower precision (fp16, int8) must also be faster than fp32 by more than that margin"
)
_BEST_BATCHES = (1, 32)
# Variants are timed all at once where their files add up to at most twice fp32's, or to this much;
# else one beside fp32 at a time. A session holds about twice its file (the weights and their packed
# copy), so a large model's build stays within 4× its weights above the fixed overhead.
_TIME_TOGETHER_BYTES = 1 << 29
_NO_CUDA_INT8 = ("onnxruntime's CUDA provider has no kernels for int8 variants (their quantize and integer MatMul nodes run "
                 "on the CPU provider, a device-host round trip each): they are a CPU deployment")

Progress = Callable[[str], None]


@dataclass
class BuildContext:
    """One build's open bundle, its PyTorch reference (built once, in this process, and shared by
    every check and calibration) and where progress goes."""

    bundle: Bundle
    reference: ModelSpec
    say: Progress
    scratch: Path  # kept for the build: what its quantizations share (pre-processed models)
    evidence: dict[Any, Any] = field(default_factory=dict)  # the reference's outputs, gathered by the first check


def build(
    model: str,
    out: str | Path,
    *,
    preset: str | None = None,
    name: str | None = None,
    static_cache: bool | None = None,
    modes: Sequence[str] | None = None,
    provider: str = "cpu",
    select: bool = True,
    max_time: float = 1.0,
    force: bool = False,
    progress: Progress | None = None,
    repair_budget: float = DEFAULT_BUDGET,
    trust_remote_code: bool = False,
) -> Bundle:
    """Builds every variant of `model` into a new bundle at `out`, checks them all, repairs those
    that fail their gates within `repair_budget` seconds in all (toolkit.compile.repair; 0: no
    repair), and (with `select`) records the fastest passing one as `best`. `modes` defaults to int8, fp16,
    int8-static where it applies (models with convolutions or a calibration set) and int4 where it
    does (transformers); `static_cache`
    (default: on for CUDA) exports a decoder's static-cache graph for CUDA graphs. A variant that
    fails (onnxruntime cannot load it, the quantizer crashes, its gates fail) is recorded as failed
    with the reason, and the build goes on. `trust_remote_code`: as export's."""
    from toolkit.compile.exporter import export
    from toolkit.compile.quantization import MODES, int4_applies, static_applies
    from toolkit.reference.source import resolve

    say = progress or (lambda _msg: None)
    if modes is not None:
        unknown = [m for m in modes if m not in MODES]
        if unknown:
            raise ToolkitError(f"unknown quantization mode {unknown[0]!r}; choose from {', '.join(MODES)}.")
    static_cache = provider == "cuda" if static_cache is None else static_cache
    bundle = export(model, out, preset=preset, name=name, static_cache=static_cache, force=force, progress=say,
                    trust_remote_code=trust_remote_code)
    say(f"building the PyTorch reference ({bundle.manifest.source.describe()}) for the checks")
    with tempfile.TemporaryDirectory(prefix="toolkit-build-") as scratch:
        context = BuildContext(bundle, resolve(bundle.manifest.source, bundle.path), say, Path(scratch))
        if modes is None:
            reason, packs = static_applies(bundle, context.reference), int4_applies(bundle)
            modes = ("int8", *(["int8-static"] if reason else []), "fp16", *(["int4"] if packs else []))
            say("int8-static: " + (reason or "skipped (no convolutions and no calibration set: dynamic int8 is the int8 path)"))
            say("int4: " + (packs or "skipped (not a transformer with MatMul weights: int4 is for those)"))
        opt_passed = _optimize(context, provider)
        _map_weights(context)
        for mode in modes:
            if mode == "int8" and opt_passed:
                _int8(context)
            elif mode == "int4" and opt_passed:
                _quantize(context, mode="int4", source=_weights_source(context, "int4"))
            elif mode == "fp16" and provider == "cuda" and opt_passed:
                _fp16_for_cuda(context)
            else:
                _quantize(context, mode=mode)
        say("checking fp32 and the quantized variants against the PyTorch reference")
        records = _check(context, [v for v in bundle.manifest.variants if v != "opt"])
        if records.get("int8") and not records["int8"]["passed"] and "failed" not in records["int8"]:
            _int8_fallback(context, records["int8"])
        _repair(context, repair_budget)
        del context  # the reference is done with: the timing below needs its memory for sessions
    release_memory()
    if select:
        select_best(bundle, provider=provider, max_time=max_time, progress=say)
    return Bundle.open(bundle.path, trust_source=True)


def _map_weights(context: BuildContext) -> None:
    """Moves the reference's weights into a file in the build's scratch, mapped back in: once the
    first check has gathered the reference's outputs, the quantizers' stages have the weights'
    memory to themselves (a 215 MB decoder's weights were held through every one of them), and
    what still runs the reference (a seq2seq decoder's sample inputs run its encoder; a check of
    another bundle) pages in what it reads. Mapping is only a saving: a module it does not take
    keeps its weights in memory."""
    import torch

    mapped: set[int] = set()
    for index, spec in enumerate([context.reference, *context.reference.parts.values()]):
        state = spec.module.state_dict()
        if not state or {t.untyped_storage().data_ptr() for t in state.values()} <= mapped:  # a part that is a submodule: mapped with it
            continue
        file = context.scratch / f"reference-weights-{index}.pt"
        try:
            torch.save(state, file)
            state = torch.load(file, mmap=True, weights_only=True)
            spec.module.load_state_dict(state, assign=True)
        except (RuntimeError, TypeError, ValueError, AttributeError, OSError) as exc:
            context.say(f"the reference's weights stay in memory (mapping them failed: {exc})")
            continue
        mapped.update(t.untyped_storage().data_ptr() for t in state.values())
    del state
    release_memory()


def _optimize(context: BuildContext, provider: str) -> bool:
    from toolkit.compile.optimizer import optimize

    try:
        optimize(context.bundle, provider=provider, progress=context.say)
    except ToolkitError as exc:
        _failed(context, "opt", exc)
        return False
    finally:
        release_memory()
    context.say("checking the optimized variant against the PyTorch reference")
    return bool(_check(context, ["opt"]).get("opt", {}).get("passed"))


def _quantize(context: BuildContext, **options: Any) -> Bundle | None:
    """quantize, where a failure is reported and the build goes on without that variant."""
    from toolkit.compile.quantization import quantize

    try:
        return quantize(context.bundle, reference=context.reference, progress=context.say, scratch=context.scratch, **options)
    except ToolkitError as exc:
        _failed(context, options["mode"], exc)
        return None
    finally:
        release_memory()


def _failed(context: BuildContext, variant: str, exc: ToolkitError) -> None:
    """Records that the build could not make `variant`, and why; the build goes on without it."""
    context.say(f"{variant} failed, going on without it: {exc}")
    context.bundle.update(lambda manifest: manifest.failed.__setitem__(variant, str(exc)))


def _check(context: BuildContext, variants: Sequence[str]) -> dict[str, dict[str, Any]]:
    """check, where a variant onnxruntime cannot load is recorded as failed with the reason."""
    from toolkit.compile.parity import check

    records = {}
    for name in variants:
        try:
            records.update(check(context.bundle, variants=[name], reference=context.reference, progress=context.say,
                                 evidence=context.evidence))
        except CheckFailed:
            raise
        except ToolkitError as exc:
            context.say(f"variant {name} cannot be checked, recorded as failed: {exc}")
            records[name] = {"passed": False, "failed": str(exc)}
            context.bundle.update(lambda manifest, name=name: setattr(manifest.variants[name], "parity", records[name]))
        finally:
            release_memory()  # one variant's session at a time
    return records


def _fp16_for_cuda(context: BuildContext) -> None:
    """fp16 end to end for CUDA: from the fused graph, whose layer norms, softmax and attention are
    kernels that accumulate in fp32, with its float inputs and outputs in fp16 too (a decoder's cache
    stays fp16 between steps) and no Casts around every normalisation."""
    from toolkit.compile.quantization import FP16_KEEP_FP32_FUSED

    _quantize(context, mode="fp16", source="opt", io="fp16", keep_fp32=FP16_KEEP_FP32_FUSED)


def _int8(context: BuildContext) -> None:
    """Dynamic int8 from the fused graph, where the quantizer reaches every weight there: attention
    (with the KV cache) then stays fused in fp32 around the int8 MatMuls, which decodes faster than
    int8 from the export's graph (benchmarks/RESULTS.md). Where a fused op holds weights the
    quantizer leaves in fp32 (BERT's `Attention` with its QKV projection), int8 comes from the
    export's graph instead."""
    from toolkit.compile.quantization import DYNAMIC_OPS

    if _weights_source(context, "int8") == "fp32":
        _quantize(context, mode="int8")
        return
    bundle = _quantize(context, mode="int8", source="opt")
    if bundle is None:
        return
    ops = bundle.variant("int8").recipe["options"]["ops"]
    left = {op: r["float"] for op, r in ops.items() if r["float"] and op in DYNAMIC_OPS}
    if left:
        context.say(f"int8 from opt leaves weights in fp32 ({', '.join(f'{op} {n}' for op, n in left.items())}): quantizing fp32 instead")
        _quantize(context, mode="int8")


def _weights_source(context: BuildContext, mode: str) -> str:
    """opt, unless a fused op there holds weights the quantizer leaves in fp32 (BERT's `Attention`
    with its QKV projection): then fp32."""
    import onnx

    graph = onnx.load(str(context.bundle.variant_path("opt")), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    fused = sum(n.op_type == "Attention" and n.domain == "com.microsoft" and n.input[1] in weights for n in graph.node)
    if fused:
        context.say(f"{mode} from fp32: opt's {fused} fused Attention hold their QKV weights, which the quantizer leaves in fp32")
        return "fp32"
    return "opt"


def _repair(context: BuildContext, budget: float) -> None:
    """Repairs each quantized variant that fails its gates (one onnxruntime could load), within
    `budget` seconds for all of them."""
    import time

    from toolkit.compile.repair import REPAIRABLE, repair

    for name in REPAIRABLE:
        record = context.bundle.manifest.variants[name].parity if name in context.bundle.manifest.variants else None
        if budget <= 0 or not record or record.get("passed") or "failed" in record:
            continue
        started = time.monotonic()
        context.say(f"{name} fails its gates: repairing it within {budget:.0f} s")
        repair(context.bundle, name, budget=budget, reference=context.reference, progress=context.say, evidence=context.evidence,
               scratch=context.scratch)
        budget -= time.monotonic() - started


def _int8_fallback(context: BuildContext, record: dict[str, Any]) -> None:
    """Accuracy-aware int8: while the variant fails its gates, keep twice as many of the most
    outlier-heavy MatMul/Gemm in fp32 (2, 4, 8, ...), up to half of them; every attempt is recorded."""
    variant = context.bundle.variant("int8")
    source, ops = variant.recipe["parent"], variant.recipe["options"]["ops"]
    limit = sum(ops.get(op, {}).get("quantized", 0) for op in ("MatMul", "Gemm")) // 2
    attempts = [_attempt(0, record)]
    keep = 2
    while keep <= limit and not record["passed"]:
        context.say(f"int8 fails its gates ({attempts[-1]['gate']}); retrying with {keep} MatMul/Gemm kept in fp32")
        if _quantize(context, mode="int8", source=source, keep_float=keep) is None:
            break
        record = _check(context, ["int8"])["int8"]
        attempts.append(_attempt(keep, record))
        keep *= 2
    context.bundle.update(lambda manifest: manifest.variants["int8"].recipe["options"].__setitem__("attempts", attempts))


def _attempt(keep: int, record: dict[str, Any]) -> dict[str, Any]:
    metric = record.get("task_metric") or {}
    return {"keep_float": keep, "passed": record["passed"], "gate": f"{metric.get('metric')} {metric.get('value', float('nan')):.4g}"}


def select_best(bundle: str | Path | Bundle, *, provider: str = "cpu", max_time: float = 1.0, progress: Progress | None = None) -> dict[str, Any]:
    """Measures the bundle's passing variants and records the choice as the manifest's `best`. Each
    variant is timed side by side with fp32, the rule's yardstick, in one interleaved run: all of
    them at once where their sessions fit in memory many times over, else one pair at a time, so that
    no more than two sessions are open at once."""
    say = progress or (lambda _msg: None)
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    passing, not_timed = timed_variants(bundle, provider)
    if not_timed:
        say(f"not timing {', '.join(not_timed)} on {provider}: {_NO_CUDA_INT8}")
    if not passing:
        raise ToolkitError(f"no variant of {bundle.path} has passed its gates; run `toolkit check {bundle.path}` and see why.")
    say(f"timing {', '.join(passing)} on {provider} to choose best ({max_time:g} s per variant and shape)")
    if "fp32" in passing:
        others = [v for v in passing if v != "fp32"]
        together = sum(bundle.variant(v).bytes for v in passing) <= max(_TIME_TOGETHER_BYTES, 2 * bundle.variant("fp32").bytes)
        measured, ratios, report = _time_beside(bundle, "fp32", [others] if together else [[v] for v in others], provider, max_time)
        choice = _choose(ratios, "fp32", [v for v in passing if bundle.variant(v).precision != "fp32"])
    else:  # fp32 failed its gates: the fastest passing variant
        measured, ratios = {}, {}
        for variant in passing:
            report = _time(bundle, [variant], provider, max_time)
            measured[variant] = {_shape(row): round(row.p50_ms, 4) for row in report.rows}
        choice = choose_best(measured)
    best = {
        "variant": choice,
        "provider": provider,
        "rule": BEST_RULE,
        "p50_ms": measured,
        **({"vs_fp32": ratios} if ratios else {}),
        "not_timed": not_timed,
        "threads": report.settings["threads"][0],
        "cpu": report.machine["cpu"],
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    bundle.update(lambda manifest: setattr(manifest, "best", best))
    say(f"best on {provider}: {choice}")
    return best


def _time_beside(bundle: Bundle, yardstick: str, groups: list[list[str]], provider: str,
                 max_time: float) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], Any]:
    """Times each group of variants side by side with `yardstick`, one group at a time; → p50 ms per
    variant and shape (the yardstick's: its median over the groups), each one's ratio to the
    yardstick within its group, and the last report."""
    measured: dict[str, dict[str, float]] = {}
    ratios: dict[str, dict[str, float]] = {}
    yardstick_ms: dict[str, list[float]] = {}
    for variants in [[yardstick, *group] for group in groups if group] or [[yardstick]]:
        report = _time(bundle, variants, provider, max_time)
        times = {(row.variant, _shape(row)): row.p50_ms for row in report.rows}
        for (variant, shape), ms in times.items():
            if variant == yardstick:
                yardstick_ms.setdefault(shape, []).append(ms)
            else:
                measured.setdefault(variant, {})[shape] = round(ms, 4)
                ratios.setdefault(variant, {})[shape] = round(ms / times[(yardstick, shape)], 4)
        release_memory()
    ratios[yardstick] = {shape: 1.0 for shape in yardstick_ms}
    return {yardstick: {s: round(float(np.median(ms)), 4) for s, ms in yardstick_ms.items()}, **measured}, ratios, report


def _time(bundle: Bundle, variants: list[str], provider: str, max_time: float) -> Any:
    from toolkit.bench.compare import bench

    dims = {d.name: d for d in bundle.manifest.dims}
    batches = _BEST_BATCHES if "batch" in dims else (1,)
    shapes = None
    if bundle.manifest.generation and "past" in dims and "seq" in dims:
        # Generation spends its time in decode steps (one new token over a cache); a batch of long
        # prompts at once would time what it rarely runs, and hold its logits (batch × seq × vocabulary).
        tokens = min(32, *(d.max for d in (dims["seq"], dims["past"]) if d.max is not None))
        shapes = [{"batch": 1, "seq": tokens, "past": 0}, *({"batch": b, "seq": 1, "past": tokens} for b in batches)]
    return bench(bundle, providers=[provider], variants=variants, batches=batches, shapes=shapes, torch_eager=False,
                 max_time=max_time, rounds=5, warmup=3)


def _shape(row: Any) -> str:
    return ", ".join(f"{name} {value}" for name, value in (("batch", row.batch), ("seq", row.seq), ("past", row.past)) if value is not None)


def timed_variants(bundle: Bundle, provider: str) -> tuple[list[str], dict[str, str]]:
    """The variants that passed their gates and are worth timing on `provider`, and those left out
    with the reason (int8 on CUDA)."""
    passing = [n for n, v in bundle.manifest.variants.items() if v.parity and v.parity["passed"]]
    not_timed = {n: _NO_CUDA_INT8 for n in passing if provider == "cuda" and bundle.variant(n).precision == "int8"}
    return [n for n in passing if n not in not_timed], not_timed


def choose_best(p50_ms: dict[str, dict[str, float]], reference: str = "fp32", lower_precision: Sequence[str] = ()) -> str:
    """The variant with the lowest geometric-mean latency ratio to `reference` among those no slower
    than it (beyond NOISE_MARGIN) at any shape, those in `lower_precision` only where they are faster
    by more than NOISE_MARGIN; `p50_ms` holds only variants that passed their gates."""
    if reference not in p50_ms:
        return min(p50_ms, key=lambda v: _geomean(list(p50_ms[v].values())))
    base = p50_ms[reference]
    return _choose({v: {s: t[s] / base[s] for s in base} for v, t in p50_ms.items()}, reference, lower_precision)


def _choose(ratios: dict[str, dict[str, float]], reference: str, lower_precision: Sequence[str]) -> str:
    # a precision given up for a gain inside the noise is a loss: it must win by more than the margin
    eligible = [v for v, r in ratios.items() if all(x <= 1.0 + NOISE_MARGIN for x in r.values())
                and (v not in lower_precision or _geomean(list(r.values())) < 1.0 - NOISE_MARGIN)]
    return min(eligible, key=lambda v: (_geomean(list(ratios[v].values())), v != reference))


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))
