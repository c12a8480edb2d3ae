"""Load on `toolkit serve` over loopback: concurrency 1, 8 and 32, with dynamic batching off
(--max-batch 1) and on, for the mlp and the encoder; throughput, p50, p99; and what the server adds
over a direct runtime call at concurrency 1. The server runs in its own process, the clients here,
sending Triton binary-tensor requests encoded once up front (so the client costs little).

    python benchmarks/serve_load.py        # uses the bundles python benchmarks/run.py built; writes
                                           # the "## Serving" section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
MODELS = ("mlp", "encoder")
CONCURRENCY = (1, 8, 32)
BATCHING_TARGET = 3.0  # encoder throughput at concurrency 32, batching on over off
OVERHEAD_TARGET_MS = 1.0  # mlp at concurrency 1, server p50 over a direct call's p50


@dataclass
class LoadRow:
    model: str
    batching: bool
    concurrency: int
    requests: int
    items_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float | None


def _request(model, seed: int = 0) -> tuple[bytes, dict[str, str], dict]:
    from toolkit.runtime.samples import make_feeds
    from toolkit.serve.protocol import HEADER_LENGTH, datatype

    feeds = make_feeds(model.inputs, {"batch": 1, "seq": 32}, seed)
    header = {"inputs": [{"name": k, "shape": list(v.shape), "datatype": datatype(v.dtype.name),
                          "parameters": {"binary_data_size": v.nbytes}} for k, v in feeds.items()],
              "parameters": {"binary_data_output": True}}
    head = json.dumps(header).encode()
    return head + b"".join(v.tobytes() for v in feeds.values()), {HEADER_LENGTH: str(len(head))}, feeds


async def _load(address: str, path: str, body: bytes, headers: dict[str, str], concurrency: int, seconds: float) -> list[float]:
    """`concurrency` keep-alive connections, each sending the same pre-built request back to back (as
    wrk does): a Python HTTP client would cost more CPU than the server it measures."""
    host, port = address.split(":")
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": address, "Content-Length": str(len(body)), **headers}.items())
    request = f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + body
    latencies: list[float] = []

    async def worker(until: float, record: bool) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < until:
                start = time.perf_counter()
                writer.write(request)
                status = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                if b" 200 " not in status:
                    raise RuntimeError(f"{path}: {status.decode().strip()}")
                if record:
                    latencies.append(time.perf_counter() - start)
        finally:
            writer.close()

    warm = time.perf_counter() + min(0.5, seconds / 4)
    await asyncio.gather(*(worker(warm, False) for _ in range(concurrency)))
    until = time.perf_counter() + seconds
    await asyncio.gather(*(worker(until, True) for _ in range(concurrency)))
    return latencies


def _batches(address: str, model: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(f"http://{address}/metrics").text

    def value(series: str) -> float:
        match = re.search(rf'^{series}{{model="{model}"}} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0

    return value("toolkit_batch_size_sum"), value("toolkit_batch_size_count")


def _server(bundles: list[Path], max_batch: int) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "toolkit.cli", "serve", *map(str, bundles), "--port", str(port), "--provider", "cpu",
               "--max-batch", str(max_batch)]
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not come up: {' '.join(command)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                return process, f"127.0.0.1:{port}"
        except httpx.TransportError:
            time.sleep(0.2)


def _direct_ms(model, feeds, seconds: float) -> float:
    """p50 of `model.run(feeds)` in this process, in ms."""
    times = []
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        start = time.perf_counter()
        model.run(feeds)
        times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50) * 1000)


def serve_load(bundles: dict[str, Path], *, seconds: float = 3.0, concurrency=CONCURRENCY) -> tuple[list[LoadRow], dict[str, float]]:
    """(rows, direct runtime numbers: mlp p50 ms at batch 1, encoder rows/s at batch 1 and 32)."""
    from toolkit.runtime.model import Model
    from toolkit.runtime.samples import make_feeds

    models = {name: Model(path, provider="cpu") for name, path in bundles.items()}
    requests = {name: _request(model) for name, model in models.items()}
    rows = []
    for batching in (False, True):
        process, address = _server(list(bundles.values()), 32 if batching else 1)
        try:
            for name in bundles:
                body, headers, _ = requests[name]
                for c in concurrency:
                    before = _batches(address, name)
                    latencies = asyncio.run(_load(address, f"/v2/models/{name}/infer", body, headers, c, seconds))
                    total, runs = (a - b for a, b in zip(_batches(address, name), before, strict=True))
                    rows.append(LoadRow(name, batching, c, len(latencies), len(latencies) / seconds,
                                        float(np.percentile(latencies, 50) * 1000), float(np.percentile(latencies, 99) * 1000),
                                        total / runs if runs else None))
                    print(f"  {name} batching={batching} c={c}: {rows[-1].items_per_s:,.0f}/s p50 {rows[-1].p50_ms:.2f} ms",
                          file=sys.stderr)
        finally:
            process.terminate()
            process.wait(30)
    direct = {"mlp_p50_ms": _direct_ms(models["mlp"], requests["mlp"][2], seconds)}
    for batch in (1, 32):
        feeds = make_feeds(models["encoder"].inputs, {"batch": batch, "seq": 32}, 0)
        direct[f"encoder_rows_per_s_batch{batch}"] = batch * 1000 / _direct_ms(models["encoder"], feeds, seconds)
    return rows, direct


def markdown(rows: list[LoadRow], direct: dict[str, float]) -> str:
    def row(model: str, batching: bool, c: int) -> LoadRow | None:
        return next((r for r in rows if (r.model, r.batching, r.concurrency) == (model, batching, c)), None)

    lines = [
        "## Serving",
        "",
        "Written by `python benchmarks/serve_load.py`: `toolkit serve` (CPU provider) in its own process, clients in another "
        "over loopback, each request one row (encoder: seq 32) as Triton binary tensors; dynamic batching off (`--max-batch 1`) "
        "and on (`--max-batch 32`, `--max-delay-ms 0`).",
        "",
        "| model | batching | concurrency | req/s | p50 ms | p99 ms | rows per run |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        batch = f"{r.mean_batch:.1f}" if r.mean_batch else "-"
        lines.append(f"| {r.model} | {'on' if r.batching else 'off'} | {r.concurrency} | {r.items_per_s:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {batch} |")
    lines += ["", "Targets:", ""]
    on, off = row("encoder", True, 32), row("encoder", False, 32)
    if on and off:
        gain = on.items_per_s / off.items_per_s
        one, many = direct["encoder_rows_per_s_batch1"], direct["encoder_rows_per_s_batch32"]
        lines.append(f"- encoder, concurrency 32, batching on over off: {gain:.2f}× throughput (target ≥ {BATCHING_TARGET:.0f}×): "
                     f"{'met' if gain >= BATCHING_TARGET else 'not met'}. Called directly in this process the model "
                     f"gives {one:,.0f} rows/s at batch 1 and {many:,.0f} at batch 32 ({many / one:.2f}×): batching cannot "
                     f"gain more than the model gains from batch size, and the unbatched server's {off.items_per_s:,.0f} req/s "
                     f"puts the ceiling at {many / off.items_per_s:.2f}×.")
    served_ms = row("mlp", False, 1).p50_ms
    direct_ms = direct["mlp_p50_ms"]
    added = served_ms - direct_ms
    lines.append(f"- mlp, concurrency 1: the server's p50 {served_ms:.3f} ms against a direct `Model.run` p50 {direct_ms:.3f} ms: "
                 f"+{added:.3f} ms per request (target ≤ {OVERHEAD_TARGET_MS:.0f} ms): {'met' if added <= OVERHEAD_TARGET_MS else 'not met'}")
    return "\n".join(lines) + "\n"


def replace_section(document: str, section: str) -> str:
    """`document` with the section `section` heads (its first line, to the next "## " or the end)
    replaced by `section`, or with `section` appended."""
    start = document.find(section.split("\n", 1)[0])
    if start < 0:
        return document.rstrip("\n") + "\n\n" + section
    end = document.find("\n## ", start + 1)
    return document[:start] + section + (document[end + 1 :] if end >= 0 else "")


def write_section(path: Path, section: str) -> None:
    """Replaces (or appends) `section` in the markdown file at `path`, which need not exist yet."""
    path.write_text(replace_section(path.read_text() if path.exists() else "", section))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles", type=Path, default=HERE / ".bundles", help="directory holding mlp/ and encoder/ bundles")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per cell")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    bundles = {name: args.bundles / name for name in MODELS}
    if missing := [str(p) for p in bundles.values() if not (p / "manifest.json").is_file()]:
        parser.error(f"no bundle at {', '.join(missing)}: run python benchmarks/run.py first, or toolkit build MODEL -o DIR")
    rows, direct = serve_load(bundles, seconds=args.seconds)
    section = markdown(rows, direct)
    write_section(args.out, section)
    (args.out.parent / "serve.json").write_text(json.dumps({"rows": [asdict(r) for r in rows], "direct": direct}, indent=2) + "\n")
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
