"""`toolkit build`: export + optimize + quantize + check in one go, then the choice of `best`.

`best` is the fastest variant that passed its gates, measured briefly on this machine: every
passing variant runs in interleaved rounds at batch 1 and 32 (seq 32 for sequence models), and the
winner is the one with the lowest geometric mean of p50 latency relative to fp32 among those that
are nowhere slower than fp32 (beyond a 5% noise margin). The measurements and the rule are recorded
in the manifest, and `toolkit.load(..., variant="best")` refuses a `best` whose variant has not
passed its gates.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from toolkit.bundle import Bundle
from toolkit.errors import ToolkitError

__all__ = ["BEST_RULE", "build", "choose_best", "select_best"]

# Two measurements of one model on a shared machine differ by a few percent; a variant within this
# margin of fp32 at some shape counts as no slower there.
NOISE_MARGIN = 0.05
BEST_RULE = (
    "lowest geometric mean of p50 latency relative to fp32 over the measured shapes, among variants that "
    f"passed their gates and are nowhere slower than fp32 by more than the {NOISE_MARGIN:.0%} noise margin"
)
_BEST_BATCHES = (1, 32)

Progress = Callable[[str], None]


def build(
    model: str,
    out: str | Path,
    *,
    preset: str | None = None,
    modes: Sequence[str] | None = None,
    provider: str = "cpu",
    select: bool = True,
    max_time: float = 1.0,
    force: bool = False,
    progress: Progress | None = None,
) -> Bundle:
    """Builds every variant of `model` into a new bundle at `out`, checks them all, and (with
    `select`) records the fastest passing one as `best`. `modes` defaults to int8, fp16, and
    int8-static where it applies (models with convolutions or a calibration set)."""
    from toolkit.check import check
    from toolkit.export import export
    from toolkit.optimize import optimize
    from toolkit.quantize import MODES, quantize, static_applies

    say = progress or (lambda _msg: None)
    if modes is not None:
        unknown = [m for m in modes if m not in MODES]
        if unknown:
            raise ToolkitError(f"unknown quantization mode {unknown[0]!r}; choose from {', '.join(MODES)}.")
    bundle = export(model, out, preset=preset, force=force, progress=say)
    if modes is None:
        reason = static_applies(bundle)
        modes = ("int8", "int8-static", "fp16") if reason else ("int8", "fp16")
        say("int8-static: " + (reason or "skipped (no convolutions and no calibration set: dynamic int8 is the int8 path)"))
    optimize(bundle.path, provider=provider, progress=say)
    say("checking the optimized variant against the PyTorch reference")
    opt_passed = check(bundle.path, variants=["opt"], progress=say)["opt"]["passed"]
    for mode in modes:
        if mode == "int8" and opt_passed:
            _int8(bundle.path, say)
        else:
            quantize(bundle.path, mode=mode, progress=say)
    say("checking fp32 and the quantized variants against the PyTorch reference")
    records = check(bundle.path, variants=[v for v in Bundle.open(bundle.path).manifest.variants if v != "opt"], progress=say)
    if "int8" in records and not records["int8"]["passed"]:
        _int8_fallback(bundle.path, records["int8"], say)
    if select:
        select_best(bundle.path, provider=provider, max_time=max_time, progress=say)
    return Bundle.open(bundle.path)


def _int8(path: Path, say: Progress) -> None:
    """Dynamic int8 from the fused graph, where the quantizer reaches every weight there: attention
    (with the KV cache) then stays fused in fp32 around the int8 MatMuls (gpt decode 0.179 against
    0.204 ms/token from the export's graph). Where a fused op holds weights the quantizer leaves in
    fp32 (BERT's `Attention` with its QKV projection), int8 comes from the export's graph instead."""
    from toolkit.quantize import DYNAMIC_OPS, quantize

    ops = quantize(path, mode="int8", source="opt", progress=say).variant("int8").recipe["options"]["ops"]
    left = {op: r["float"] for op, r in ops.items() if r["float"] and op in DYNAMIC_OPS}
    if left:
        say(f"int8 from opt leaves weights in fp32 ({', '.join(f'{op} {n}' for op, n in left.items())}): quantizing fp32 instead")
        quantize(path, mode="int8", progress=say)


def _int8_fallback(path: Path, record: dict[str, Any], say: Progress) -> None:
    """Accuracy-aware int8: while the variant fails its gates, keep twice as many of the most
    outlier-heavy MatMul/Gemm in fp32 (2, 4, 8, ...), up to half of them; every attempt is recorded."""
    from toolkit.check import check
    from toolkit.quantize import quantize

    bundle = Bundle.open(path)
    source = bundle.variant("int8").recipe["parent"]
    ops = bundle.variant("int8").recipe["options"]["ops"]
    limit = sum(ops.get(op, {}).get("quantized", 0) for op in ("MatMul", "Gemm")) // 2
    attempts = [_attempt(0, record)]
    keep = 2
    while keep <= limit and not record["passed"]:
        say(f"int8 fails its gates ({attempts[-1]['gate']}); retrying with {keep} MatMul/Gemm kept in fp32")
        quantize(path, mode="int8", source=source, keep_float=keep, progress=say)
        record = check(path, variants=["int8"], progress=say)["int8"]
        attempts.append(_attempt(keep, record))
        keep *= 2
    bundle = Bundle.open(path)
    bundle.manifest.variants["int8"].recipe["options"]["attempts"] = attempts
    bundle.save()


def _attempt(keep: int, record: dict[str, Any]) -> dict[str, Any]:
    metric = record.get("task_metric") or {}
    return {"keep_float": keep, "passed": record["passed"], "gate": f"{metric.get('metric')} {metric.get('value', float('nan')):.4g}"}


def select_best(path: str | Path, *, provider: str = "cpu", max_time: float = 1.0, progress: Progress | None = None) -> dict[str, Any]:
    """Measures the bundle's passing variants and records the choice as the manifest's `best`."""
    from toolkit.bench import bench

    say = progress or (lambda _msg: None)
    bundle = Bundle.open(path)
    passing = [n for n, v in bundle.manifest.variants.items() if v.parity and v.parity["passed"]]
    if not passing:
        raise ToolkitError(f"no variant of {bundle.path} has passed its gates; run `toolkit check {bundle.path}` and see why.")
    dims = {d.name for d in bundle.manifest.dims}
    batches = _BEST_BATCHES if "batch" in dims else (1,)
    say(f"timing {', '.join(passing)} on {provider} to choose best ({max_time:g} s per variant and shape)")
    report = bench(path, providers=[provider], variants=passing, batches=batches, torch_eager=False,
                   max_time=max_time, rounds=5, warmup=3)
    measured: dict[str, dict[str, float]] = {}
    for row in report.rows:
        shape = f"batch {row.batch}" + (f", seq {row.seq}" if row.seq is not None else "")
        measured.setdefault(row.variant, {})[shape] = round(row.p50_ms, 4)
    choice = choose_best(measured)
    best = {
        "variant": choice,
        "provider": provider,
        "rule": BEST_RULE,
        "p50_ms": measured,
        "threads": report.settings["threads"][0],
        "cpu": report.machine["cpu"],
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    bundle.manifest.best = best  # bench only reads the bundle: this manifest is still current
    bundle.save()
    say(f"best on {provider}: {choice}")
    return best


def choose_best(p50_ms: dict[str, dict[str, float]], reference: str = "fp32") -> str:
    """The variant with the lowest geometric-mean latency ratio to `reference` among those no slower
    than it (beyond NOISE_MARGIN) at any shape; `p50_ms` holds only variants that passed their gates."""
    if reference not in p50_ms:
        return min(p50_ms, key=lambda v: _geomean(list(p50_ms[v].values())))
    base = p50_ms[reference]
    ratios = {v: [t[s] / base[s] for s in base] for v, t in p50_ms.items()}
    eligible = [v for v, r in ratios.items() if all(x <= 1.0 + NOISE_MARGIN for x in r)]
    return min(eligible, key=lambda v: (_geomean(ratios[v]), v != reference))


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))
