"""The GPU measurements of benchmarks/cuda/RESULTS.md, in one process on one GPU, side by side:

- gemm: onnxruntime's fp32 and fp16 MatMul peaks (and torch's fp16 peak) on this GPU;
- decode: GPT-2 small (124M, seeded, untrained) decoding per token at batch 1 and 8, fp16: CUDA graphs
  over the static cache against the growing cache (IO binding), torch eager with its KV cache, and
  torch.compile(mode="reduce-overhead") over the same static cache; greedy tokens compared;
- bert: BERT-base at batch 32, seq 128: fp16 (and with a CUDA graph) against torch eager, as a share
  of the fp16 GEMM peak measured here;
- lstm: the reference LSTM against torch's cuDNN LSTM, with onnxruntime's per-node profile (which
  nodes run where and for how long).

Every variant timed here is built by toolkit's own stages and checked (`check`) on CUDA first.

    python benchmarks/cuda/gpu.py --out DIR [--sections gemm,decode,bert,lstm] [--budget SECONDS]
    python benchmarks/cuda/gpu.py --out DIR --dry-run     # the same code on the CPU with tiny models

Results go to DIR/gpu.json after every section (so a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from toolkit.bench.measure import gemm_peak, measure, ort_step  # noqa: E402
from toolkit.compile import check, export, optimize, quantize  # noqa: E402
from toolkit.compile.quantization import FP16_KEEP_FP32_FUSED  # noqa: E402
from toolkit.runtime import Generator, Model  # noqa: E402
from toolkit.runtime.samples import make_feeds  # noqa: E402

SECTIONS = ("gemm", "decode", "bert", "lstm", "compile")
# What a run measures: the device, and the presets (`--dry-run`: the CPU and tiny models, to try the script).
RUN = {"device": "cuda", "gpt": "gpt2-small", "encoder": "bert-base", "lstm": "default", "vocab": 50257, "new": 64, "fp16": True}
DRY_RUN = {"device": "cpu", "gpt": "tiny", "encoder": "tiny", "lstm": "tiny", "vocab": 257, "new": 8, "fp16": False}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; sections that would start later are skipped")
    parser.add_argument("--work", type=Path, default=None, help="where bundles are built (default: a temporary directory)")
    parser.add_argument("--dry-run", action="store_true", help="run every section on the CPU with tiny models")
    args = parser.parse_args()
    import onnxruntime
    import torch

    if args.dry_run:
        RUN.update(DRY_RUN)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0) if RUN["device"] == "cuda" else "none (dry run)", "cpu": platform.processor(), "cores": os.cpu_count(),
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "numpy": np.__version__},
        "sections": {},
    }
    deadline = time.monotonic() + args.budget
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    for name in args.sections.split(","):
        left = deadline - time.monotonic()
        if left < 30:
            results["sections"][name] = {"skipped": f"out of time ({left:.0f} s left)"}
            continue
        started = time.monotonic()
        print(f"== {name} ({left:.0f} s left)", flush=True)
        try:
            results["sections"][name] = globals()[f"section_{name}"](work, deadline)
        except Exception:
            results["sections"][name] = {"error": traceback.format_exc()[-4000:]}
            print(results["sections"][name]["error"], flush=True)
        results["sections"][name]["seconds"] = round(time.monotonic() - started, 1)
        (args.out / "gpu.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


def say(message: str) -> None:
    print(f"  {message}", flush=True)


def section_gemm(work: Path, deadline: float) -> dict[str, Any]:
    import torch

    sizes = (2048, 4096, 8192) if RUN["device"] == "cuda" else (256,)
    out = {f"ort_{dtype}_gflops": round(gemm_peak(RUN["device"], threads=os.cpu_count() or 1, sizes=sizes, dtype=dtype), 1)
           for dtype in ("float32", "float16")}
    if RUN["device"] != "cuda":
        return out
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start, runs = time.perf_counter(), 10
    for _ in range(runs):
        a @ a
    torch.cuda.synchronize()
    out["torch_float16_gflops"] = round(2 * 8192**3 * runs / (time.perf_counter() - start) / 1e9, 1)
    return out


def _build(work: Path, model: str, preset: str) -> Path:
    """export → optimize (for CUDA) → fp16 end to end from opt."""
    path = work / f"{model}-{preset}"
    say(f"exporting {model} {preset}")
    export(model, path, preset=preset, force=True, isolate=False, static_cache=True, progress=say)
    optimize(path, provider=RUN["device"], progress=say)
    quantize(path, mode="fp16", source="opt", io="fp16", keep_fp32=FP16_KEEP_FP32_FUSED, progress=say)
    return path


def _parity(path: Path, variants: list[str]) -> dict[str, Any]:
    records = check(path, variants=variants, provider=RUN["device"], progress=say)
    return {name: {"passed": r["passed"], "parts": r.get("parts"),
                   "max_rel_err": {o: s["max_rel_err"] for o, s in r["outputs"].items() if o == "logits" or len(r["outputs"]) == 1},
                   "task_metric": r.get("task_metric"), "greedy": r.get("greedy"), "errors": r["errors"][:3]}
            for name, r in records.items()}


def _p50_ms(samples: Any) -> float:
    return round(float(np.median(samples)) * 1e3, 4)


# ---------------------------------------------------------------- decode


def section_decode(work: Path, deadline: float) -> dict[str, Any]:

    import models
    from models.gpt import CachedDecoder

    path = _build(work, "gpt", RUN["gpt"])
    out: dict[str, Any] = {"parity": _parity(path, ["fp16"])}
    spec = models.build("gpt", RUN["gpt"])
    gpt = spec.module.gpt.to(RUN["device"])
    gpt = gpt.half() if RUN["fp16"] else gpt
    eager = CachedDecoder(gpt).eval()
    graphs = Generator(path, variant="fp16", provider=RUN["device"], cache="static")
    growing = Generator(path, variant="fp16", provider=RUN["device"], cache="growing")
    out["generator"] = {"decode": graphs.decode, "note": graphs.note}
    rows, new = [], RUN["new"]
    for batch in (1, 8):
        prompts = np.random.default_rng(batch).integers(0, RUN["vocab"], size=(batch, 32)).tolist()
        candidates = {"ort fp16 + CUDA graphs": lambda p=prompts: _generator_steps(graphs, p, new),
                      "ort fp16, growing cache": lambda p=prompts: _generator_steps(growing, p, new),
                      "torch eager fp16, KV cache": lambda p=prompts: _torch_eager_steps(eager, p, new)}
        tokens = {name: run()[1] for name, run in candidates.items()}  # warm-up, and the tokens each produces
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for r in range(3):
            for name in list(candidates)[r % 3:] + list(candidates)[: r % 3]:
                times[name] += candidates[name]()[0]
        for name, samples in times.items():
            rows.append({"batch": batch, "candidate": name, "decode_ms_per_token": _p50_ms(samples)})
        reference = tokens["torch eager fp16, KV cache"]
        out.setdefault("greedy", {})[f"batch {batch}"] = {
            "graphs_equal_growing": bool(np.array_equal(tokens["ort fp16 + CUDA graphs"], tokens["ort fp16, growing cache"])),
            "graphs_vs_torch_token_agreement": float(np.mean(np.cumprod(tokens["ort fp16 + CUDA graphs"] == reference, axis=1)))}
        out["rows"] = rows
        say(f"batch {batch}: " + ", ".join(f"{r['candidate']} {r['decode_ms_per_token']}" for r in rows if r["batch"] == batch))
    out["rows"] = rows
    return out


def section_compile(work: Path, deadline: float) -> dict[str, Any]:
    """torch.compile(mode="reduce-overhead") of the decode section's model, last: compiling takes a
    minute or two."""
    import models
    from models.gpt import StaticCacheDecoder

    if RUN["device"] != "cuda":
        return {"skipped": "CUDA graphs of torch.compile need CUDA"}
    gpt = models.build("gpt", RUN["gpt"]).module.gpt.cuda().half()
    return _torch_compile_rows(StaticCacheDecoder(gpt).eval(), deadline)


def _generator_steps(generator: Generator, prompts: list[list[int]], new: int) -> tuple[list[float], np.ndarray]:
    times, tokens, last = [], [], time.perf_counter()
    for step in generator.tokens(prompts, max_new_tokens=new):
        now = time.perf_counter()
        times.append(now - last)
        tokens.append(step)
        last = now
    return times[1:], np.stack(tokens, axis=1)  # the first is the prompt step


def _torch_eager_steps(module: Any, prompts: list[list[int]], new: int) -> tuple[list[float], np.ndarray]:
    """torch's own loop with its KV cache on the GPU: the cache grows by concatenation, the next token
    is the argmax, each step synchronised (the token reaches the host, as the Generator's does)."""
    import torch

    cfg, device = module.gpt.cfg, RUN["device"]
    ids = torch.tensor(prompts, device=device)
    batch, length = ids.shape
    mask = torch.ones_like(ids)
    positions = torch.arange(length, device=device).expand(batch, length)
    empty = torch.zeros((batch, cfg.heads, 0, cfg.d_model // cfg.heads), device=device, dtype=module.gpt.wte.weight.dtype)
    past = [empty] * (2 * cfg.layers)
    times, tokens, last = [], [], time.perf_counter()
    with torch.inference_mode():
        for _ in range(new):
            logits, *past = module(ids, mask, positions, *past)
            token = logits[:, -1].argmax(-1)
            tokens.append(token.cpu().numpy())
            now = time.perf_counter()
            times.append(now - last)
            last = now
            ids, positions = token[:, None], positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    return times[1:], np.stack(tokens, axis=1)


def _torch_compile_rows(static: Any, deadline: float) -> dict[str, Any]:
    """torch.compile(mode="reduce-overhead") over the static-cache module: fixed shapes per step, so
    one CUDA graph replays every decode step (the prompt runs eagerly)."""
    import torch

    cfg = static.gpt.cfg
    compiled = torch.compile(static, mode="reduce-overhead")
    rows = {}
    for batch in (1, 8):
        started = time.perf_counter()
        prompts = torch.tensor(np.random.default_rng(batch).integers(0, RUN["vocab"], size=(batch, 32)), device="cuda")
        samples = []
        for r in range(4):  # round 0 compiles and warms up
            times = _static_torch_steps(static, compiled, prompts, RUN["new"], cfg)
            if r:
                samples += times
        rows[f"batch {batch}"] = {"decode_ms_per_token": _p50_ms(samples), "first_round_s": round(time.perf_counter() - started, 1)}
        say(f"torch.compile batch {batch}: {rows[f'batch {batch}']}")
        if time.monotonic() > deadline - 20:
            break
    return rows


def _static_torch_steps(static: Any, compiled: Any, prompts: Any, new: int, cfg: Any) -> list[float]:
    import torch

    batch, length = prompts.shape
    context, head = cfg.context, cfg.d_model // cfg.heads
    mask = torch.zeros((batch, context), dtype=torch.long, device="cuda")
    mask[:, :length] = 1
    caches = [torch.zeros((batch, cfg.heads, context, head), device="cuda", dtype=torch.float16) for _ in range(2 * cfg.layers)]
    positions = torch.arange(length, device="cuda").expand(batch, length)
    times = []
    with torch.inference_mode():
        logits, *caches = static(prompts, mask, positions, torch.arange(length, device="cuda"), *caches)
        token = logits[:, -1].argmax(-1)
        token.cpu()
        last = time.perf_counter()
        for step in range(new - 1):
            mask[:, length + step] = 1
            torch.compiler.cudagraph_mark_step_begin()
            logits, *caches = compiled(token[:, None], mask, positions[:, -1:] + 1 + step,
                                       torch.tensor([length + step], device="cuda"), *caches)
            token = logits[:, -1].argmax(-1)
            token.cpu()
            now = time.perf_counter()
            times.append(now - last)
            last = now
    return times


# ---------------------------------------------------------------- bert


def section_bert(work: Path, deadline: float) -> dict[str, Any]:
    import torch

    import models
    from toolkit.bench.flops import graph_flops

    device = RUN["device"]
    path = _build(work, "encoder", RUN["encoder"])
    out: dict[str, Any] = {"parity": _parity(path, ["opt", "fp16"])}
    sizes = {"batch": 32, "seq": 128 if device == "cuda" else 16}
    spec = models.build("encoder", RUN["encoder"])
    feeds = make_feeds(spec.inputs, sizes, seed=0)
    steps = {}
    for dtype in ("float32", "float16") if RUN["fp16"] else ("float32",):
        module = spec.module if dtype == "float32" else copy.deepcopy(spec.module).half()
        module = module.to(device).eval()
        args = [torch.from_numpy(feeds[t.name]).to(device) for t in spec.inputs]
        steps[f"torch eager {dtype}"] = _torch_step(module, args)
    for variant, graph in (("opt", False), ("fp16", False), ("fp16", True)):
        if graph and device != "cuda":
            continue
        model = Model(path, variant=variant, provider=device, cuda_graph=graph)
        steps[f"ort {variant}{' + CUDA graph' if graph else ''}"] = ort_step(model.session, model.validate(model.cast(feeds)), device,
                                                                             1 if graph else None)
    latencies, _ = measure(steps, max_time=2.0 * len(steps), rounds=5, warmup=10)
    flop = graph_flops(path / "model.fp32.onnx", sizes)
    peak16 = gemm_peak(device, threads=os.cpu_count() or 1, sizes=(4096, 8192) if device == "cuda" else (256,), dtype="float16")
    rows = []
    for name, samples in latencies.items():
        p50 = float(np.median(samples))
        rows.append({"candidate": name, "p50_ms": round(p50 * 1e3, 3), "tflops": round(flop / p50 / 1e12, 1),
                     "share_of_fp16_peak": round(flop / p50 / (peak16 * 1e9), 3)})
    for row in rows:
        for dtype in ("float32", "float16"):
            base = next((r["p50_ms"] for r in rows if r["candidate"] == f"torch eager {dtype}"), None)
            row[f"x_torch_{dtype}"] = round(base / row["p50_ms"], 2) if base else None
    out.update(rows=rows, gflop_per_call=round(flop / 1e9, 1), fp16_gemm_peak_gflops=round(peak16, 1), sizes=sizes)
    say("; ".join(f"{r['candidate']} {r['p50_ms']} ms ({r['share_of_fp16_peak']:.0%} of peak)" for r in rows))
    return out


def _torch_step(module: Any, args: list[Any]) -> Any:
    import torch

    synchronize = torch.cuda.synchronize if RUN["device"] == "cuda" else (lambda: None)

    def step() -> None:
        with torch.inference_mode():
            module(*args)
        synchronize()

    return step


# ---------------------------------------------------------------- lstm


def section_lstm(work: Path, deadline: float) -> dict[str, Any]:
    import torch

    import models

    device = RUN["device"]
    path = work / "lstm"
    export("lstm", path, preset=RUN["lstm"], force=True, isolate=False, progress=say)
    optimize(path, provider=device, progress=say)
    out: dict[str, Any] = {"parity": _parity(path, ["fp32", "opt"])}
    spec = models.build("lstm", RUN["lstm"])
    module = spec.module.to(device).eval()
    rows, profiles = [], {}
    for batch in (1, 32):
        feeds = make_feeds(spec.inputs, {"batch": batch, "seq": 32}, seed=0)
        steps = {"torch eager (cuDNN)": _torch_step(module, [torch.from_numpy(feeds[t.name]).to(device) for t in spec.inputs])}
        for variant in ("fp32", "opt"):
            model = Model(path, variant=variant, provider=device)
            steps[f"ort {variant}"] = ort_step(model.session, model.validate(feeds), device)
            profiles[f"{variant} batch {batch}"] = _profile(path / f"model.{variant}.onnx", feeds)
        latencies, _ = measure(steps, max_time=1.0 * len(steps), rounds=5, warmup=10)
        torch_p50 = float(np.median(latencies["torch eager (cuDNN)"]))
        rows += [{"batch": batch, "candidate": name, "p50_ms": round(float(np.median(s)) * 1e3, 3),
                  "x_torch": round(torch_p50 / float(np.median(s)), 2)} for name, s in latencies.items()]
    out.update(rows=rows, profiles=profiles)
    say("; ".join(f"b{r['batch']} {r['candidate']} {r['p50_ms']} ms" for r in rows))
    return out


def _profile(model_file: Path, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per node: the provider it ran on and its time in onnxruntime's profile, over 20 runs."""
    import onnxruntime as ort

    from toolkit.runtime.session import new_session

    options = ort.SessionOptions()
    options.enable_profiling = True
    session = new_session(str(model_file), RUN["device"], options)
    for _ in range(20):
        session.run(None, feeds)
    profile = Path(session.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    nodes: dict[str, dict[str, Any]] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args and event["name"].endswith("_kernel_time"):
            node = nodes.setdefault(event["name"].removesuffix("_kernel_time"),
                                    {"op": args.get("op_name"), "provider": args["provider"], "us": 0.0})
            node["us"] += event.get("dur", 0) / 20
    return {"nodes": {k: {**v, "us": round(v["us"], 1)} for k, v in sorted(nodes.items(), key=lambda kv: -kv[1]["us"])},
            "cpu_nodes": [k for k, v in nodes.items() if v["provider"] == "CPUExecutionProvider"]}


if __name__ == "__main__":
    sys.exit(main())
