"""Tables and text the CLI prints: parity records, the build summary, bench rows, a bundle's description."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["bench_table", "build_table", "description", "parity_table", "verdict"]


def parity_table(console: Console, records: dict[str, Any], title: str) -> None:
    table = Table("variant", "check", "measured", "", "allowed", "result", title=title)
    for name, record in records.items():
        rel = record["tolerance"]["rel"]
        for output, stats in record["outputs"].items():
            table.add_row(
                name, f"output {output}", f"abs {stats['max_abs_err']:.3g}", f"rel {stats['max_rel_err']:.3g}",
                "task metrics" if rel is None else f"rel {rel:g}", Text("info", style="dim") if rel is None else verdict(stats["passed"]),
            )
        if "accuracy" in record:
            acc = record["accuracy"]
            table.add_row(
                name, "accuracy", f"ref {acc['reference']:.2%}", f"got {acc['variant']:.2%}",
                f"drop ≤ {record['tolerance']['max_accuracy_drop']:.1%}", verdict(acc["passed"]),
            )
        metric = record.get("task_metric")
        if metric:
            bound = "reported" if metric["threshold"] is None else ("≤ " if metric["metric"] == "max_score_rel" else "≥ ") + f"{metric['threshold']:g}"
            table.add_row(name, metric["metric"], f"{metric['value']:.4g}", metric["inputs"], bound, verdict(metric["passed"]))
        drift = record.get("attribution_drift")
        if drift and "spearman" in drift:
            table.add_row(name, "attribution drift", f"Spearman {drift['spearman']:.3f}", f"{drift['rows']} rows, {drift['method']}",
                          "reported", Text("info", style="dim"))
        if record["errors"]:
            table.add_row(name, "errors", str(len(record["errors"])), "", "0", verdict(False))
    console.print(table)
    for name, record in records.items():
        for problem in record["errors"]:
            console.print(Text(f"{name}: ", style="red") + Text(problem))
    first = next(iter(records.values()))
    sizes = sorted({json.dumps(c["sizes"]) for c in first["cases"]})
    console.print(f"{len(first['cases'])} cases per variant (seeds × sizes {', '.join(sizes)}); runtime {first['runtime']}")


def localization_table(console: Console, localization: Any) -> None:
    """Where a variant departs from its reference graph (toolkit.compile.localize)."""
    loc = localization
    table = Table("where", "tensor", "op", "PyTorch module", "max abs", "rel", "inputs' rel", "value range",
                  title=f"localize {loc.variant} against {loc.reference}: {loc.bundle}")
    rows = [("outputs", e) for e in loc.outputs]
    if loc.first is not None:
        rows.append(("first past tolerance", loc.first))
    if loc.growth is not None and loc.growth != loc.first:
        rows.append(("grows most", loc.growth))
    for where, e in rows:
        table.add_row(where, e.tensor, e.op, e.module or "—", f"{e.max_abs:.3g}", Text(f"{e.rel:.3g}", style="red" if e.rel > loc.tolerance else ""),
                      "—" if e.inputs_rel is None else f"{e.inputs_rel:.3g}", e.cause or "—")
    console.print(table)
    if loc.first is None:
        console.print(f"no tensor of {loc.variant} departs past rel {loc.tolerance:g} on {loc.inputs}")
    console.print(f"{loc.matched} tensors matched, {len(loc.tensors)} measured in {loc.runs} onnxruntime runs (mode {loc.mode}) "
                  f"on {loc.inputs}; a tensor departs past rel {loc.tolerance:g} (max abs error / max |{loc.reference}|)")


def verdict(ok: bool) -> Text:
    return Text("pass", style="green") if ok else Text("FAIL", style="bold red")


def build_table(console: Console, manifest: Any, path: Any) -> None:
    """Every variant with its size, gates and timings, and which one is best."""
    best = manifest.best or {}
    shapes = list(next(iter(best.get("p50_ms", {}).values()), {}))  # every variant is timed at the same shapes
    table = Table("variant", "precision", "size", "gates", "status", *(f"p50 ms, {s}" for s in shapes), "", title=f"build: {path}")
    for name, variant in manifest.variants.items():
        record = variant.parity or {}
        times = best.get("p50_ms", {}).get(name, {})
        table.add_row(
            name, variant.precision, f"{variant.bytes / 1e6:.2f} MB", _gate_summary(record), verdict(bool(record.get("passed"))),
            *(f"{times[s]:.3f}" if s in times else "-" for s in shapes),
            Text("best", style="bold green") if best.get("variant") == name else "",
        )
    for name in manifest.failed:
        if name not in manifest.variants:
            table.add_row(name, "-", "-", "could not be made", verdict(False), *("-" for _ in shapes), "")
    console.print(table)
    for name, why in manifest.failed.items():
        console.print(Text(f"{name}: ", style="red") + Text(why))
    for name, variant in manifest.variants.items():
        repaired = (variant.recipe.get("options") or {}).get("repair")
        if repaired:
            console.print(Text(f"{name}: ", style="green" if repaired["passed"] else "red") + Text(_repair_line(repaired)))
    for name, why in (best.get("not_timed") or {}).items():
        console.print(Text(f"{name}: not timed on {best['provider']}: ", style="dim") + Text(why))
    if best:
        console.print(f"best: {best['variant']} on {best['provider']} ({best['threads']} threads, {best['cpu']}); rule: {best['rule']}")


def _repair_line(repaired: dict[str, Any]) -> str:
    """What a repair did (toolkit.compile.repair), in a line."""
    tries = f"{len(repaired['attempts'])} attempts, {repaired['seconds']:.0f} s"
    if not repaired["passed"]:
        last = repaired["attempts"][-1]["gate"] if repaired["attempts"] else "no attempt fit the budget"
        binds = f"; {repaired['binds']['verdict']}" if repaired.get("binds") else ""
        if repaired.get("note", "").startswith("bound to fail"):  # it stopped early, not for want of time
            return f"not repaired ({tries}): {repaired['note']}; last: {last}{binds}"
        return f"not repaired within {repaired['budget']:.0f} s ({tries}); last: {last}" + (f" ({repaired['note']})" if repaired.get("note") else "") + binds
    if not repaired["kept"]:
        settings = repaired["attempts"][-1]["settings"]
        return f"repaired by {', '.join(f'{k}={v}' for k, v in settings.items())} with no node kept in fp32 ({tries})"
    fixed = f", where the fixed op-type list kept {repaired['fixed_list_nodes']}" if "fixed_list_nodes" in repaired else ""
    kept = "; ".join(f"{k['node']} ({k['module'] or k['op']}: {k['why']})" for k in repaired["kept"])
    count = len(repaired['kept'])
    return f"repaired keeping {count} node{'s' if count != 1 else ''} in fp32{fixed} ({tries}): {kept}"


def _gate_summary(record: dict[str, Any]) -> str:
    if not record:
        return "not checked"
    parts = []
    if record["tolerance"]["rel"] is not None:
        parts.append(f"rel err {max(s['max_rel_err'] for s in record['outputs'].values()):.1g}")
    if "accuracy" in record:
        parts.append(f"acc {record['accuracy']['variant']:.1%} (ref {record['accuracy']['reference']:.1%})")
    metric = record.get("task_metric")
    if metric:
        short = {"top1_agreement": "top-1", "next_token_agreement": "next-token", "min_cosine": "cos", "max_score_rel": "score err"}
        parts.append(f"{short.get(metric['metric'], metric['metric'])} {metric['value']:.4g}")
    if record["errors"]:
        parts.append(f"{len(record['errors'])} errors")
    return ", ".join(parts)


def bench_table(console: Console, report: Any) -> None:
    cuda = any(r.provider == "cuda" for r in report.rows)
    several = len(report.settings["threads"]) > 1
    dims = any(r.dims for r in report.rows)
    columns = ["provider", "variant", *(["threads"] if several else []), "batch", "seq", *(["other dims"] if dims else []), "p50 ms", "p90 ms", "p99 ms", "items/s", "× torch", "GFLOP/s (% peak)", "mem MB", "parity"]
    table = Table(*columns, *(["CPU nodes"] if cuda else []), title=f"bench: {report.rows[0].model if report.rows else ''}")
    for r in report.rows:
        flops = f"{r.gflops_per_s:.1f} ({r.gflops_per_s / r.gemm_peak_gflops_per_s:.0%})" if r.gflops_per_s and r.gemm_peak_gflops_per_s else "-"
        table.add_row(
            r.provider, r.variant, *([str(r.threads)] if several else []), str(r.batch), "-" if r.seq is None else str(r.seq),
            *([r.dims or "-"] if dims else []), f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}",
            f"{r.p99_ms:.3f}", f"{r.items_per_s:,.0f}", "-" if r.speedup_vs_torch is None else f"{r.speedup_vs_torch:.2f}",
            flops, "-" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.1f}",
            verdict(True) if r.parity == "pass" else (Text(r.parity, style="bold red") if r.parity == "FAIL" else Text(r.parity, style="dim")),
            *([("-" if r.cpu_nodes is None else str(r.cpu_nodes))] if cuda else []),
        )
    console.print(table)
    m, st = report.machine, report.settings
    peaks = ", ".join(f"{p} {v:g}" for p, v in m["gemm_peak_gflops_per_s"].items())
    console.print(f"{m['cpu']}{', ' + m['gpu'] if 'gpu' in m else ''}; {', '.join(map(str, st['threads']))} threads; GEMM peak GFLOP/s: {peaks}; "
                  f"{st['rounds']} interleaved rounds, {st['max_time_s_per_cell']:g} s per cell, {st['warmup']} warm-up runs")


def description(console: Console, info: dict[str, Any]) -> None:
    """`toolkit inspect`: what a bundle holds."""
    source = info["source"]
    console.print(Text(info["name"], style="bold") + Text(f" ({info['task']}): {info['description']}"))
    console.print(f"source: {json.dumps(source)}; opset {info['opset']}; exported with torch {info['versions'].get('torch')}")
    io = Table("", "name", "dtype", "shape", title="inputs and outputs")
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            io.add_row(kind[:-1], t["name"], t["dtype"], "[" + ", ".join(map(str, t["shape"])) + "]")
    console.print(io)
    dims = ", ".join(f"{n} in [{d['min']}, {d['max'] if d['max'] is not None else '∞'}]" for n, d in info["dims"].items())
    console.print(f"dynamic dims: {dims or 'none'}")
    for part, where in info["parts"].items():
        console.print(f"part {part}: a bundle of its own at {where} (`toolkit inspect {where}`)")
    for name, v in info["variants"].items():
        console.print(Text(f"\nvariant {name}", style="bold") + Text(
            f": {v['file']}, {v['bytes'] / 1e6:.2f} MB, {v['precision']}, recipe {json.dumps(v['recipe'])}"))
        console.print(f"  integrity: {v['integrity']}; parity: {v['parity']}")
        if "ops" in v:
            console.print(f"  {v['nodes']} nodes, {v['parameters']:,} parameters, IR {v['ir_version']}, opsets {v['opsets']}")
            console.print("  ops: " + ", ".join(f"{op}×{n}" for op, n in v["ops"].items()))
    for name, why in info["failed"].items():
        console.print(Text(f"\nnot made: {name}: ", style="red") + Text(why))
    best = info["best"]
    if best:
        console.print(f"\nbest: {best['variant']} on {best['provider']} ({best['threads']} threads, {best['cpu']}, "
                      f"{best['measured_at']}); rule: {best['rule']}")
    console.print("\nproviders: " + "; ".join(f"{k} {v}" for k, v in info["providers"].items()))


def _fine_tune_line(fine_tune: Any) -> str:
    if not isinstance(fine_tune, dict):
        return f"fine-tune: {fine_tune or 'no recipe'}"
    if "metric" not in fine_tune:  # a user recipe's own metrics
        return "fine-tuned: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fine_tune.items())
    stages = [(stage, fine_tune[stage]) for stage in ("unpruned", "pruned", "fine_tuned") if stage in fine_tune]
    length = ", ".join(f"{fine_tune[k]} {k}" for k in ("steps", "epochs") if k in fine_tune)
    return f"fine-tuned ({length}): {fine_tune['metric']} " + " → ".join(f"{v:.4f} {stage.replace('_', '-')}" for stage, v in stages)


def pruning_table(console: Console, manifest: Any, path: Any) -> None:
    """What `toolkit prune` removed and kept, its cost before and after, and its gates."""
    record = manifest.pruning
    table = Table(title=f"pruned {manifest.name} ({record['method']}, amount {record['amount']:g}): {path}")
    for column in ("module", "change"):
        table.add_column(column)
    for module, change in record["removed"].items():
        table.add_row(module, ", ".join(f"{k} {v[0]} → {v[1]}" if isinstance(v, list) and len(v) == 2 and k != "removed" else f"{k} {v}"
                                        for k, v in change.items()))
    for module, why in record["kept"].items():
        table.add_row(Text(module, style="dim"), Text(f"kept: {why}", style="dim"))
    console.print(table)
    (macs0, macs1), (params0, params1) = record["macs"], record["params"]
    console.print(f"parameters {params0:,} → {params1:,} ({params1 / params0:.2f}×), MACs {macs0:,} → {macs1:,} ({macs1 / macs0:.2f}×)"
                  + f"; {_fine_tune_line(record['fine_tune'])}")
    gate, metric = record["gate"], record["gate"]["task_metric"]
    line = f"task gate against the unpruned model: {metric['metric']} {metric['value']:.4f} (threshold {metric['threshold']})"
    if "accuracy" in gate:
        accuracy = gate["accuracy"]
        line += f", accuracy {accuracy['unpruned']:.4f} → {accuracy['pruned']:.4f} (drop {accuracy['drop']:.4f}, at most {gate['tolerance']['max_accuracy_drop']})"
    console.print(Text(f"{line}: ").append(verdict(gate["passed"])))
    parity = manifest.variants["fp32"].parity or {}
    console.print(Text("fp32 against the pruned PyTorch model: ").append(verdict(bool(parity.get("passed"))))
                  .append("" if parity.get("passed") else f" ({'; '.join(parity.get('errors', []))})"))
