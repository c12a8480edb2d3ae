"""Load on `toolkit serve` over loopback: concurrency 1, 8 and 32, with dynamic batching off
(--max-batch 1) and on, for the mlp and the encoder; throughput, p50, p99; and what the server adds
over a direct runtime call at concurrency 1. The server runs in its own process, the clients here,
sending Triton binary-tensor requests encoded once up front (so the client costs little).

    python benchmarks/serve_load.py        # uses the bundles python benchmarks/run.py built; writes
                                           # the "## Serving" section of benchmarks/RESULTS.md
    python benchmarks/serve_load.py --soak # the server under hostile traffic (see `soak`); writes
                                           # "## Serving under hostile traffic" and serve_soak.json
    python benchmarks/serve_load.py --ray  # native against Ray Serve with 1 and 2 replicas; writes
                                           # "## Serving on Ray" and serve_ray.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
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


async def _load(address: str, path: str, body: bytes, headers: dict[str, str], concurrency: int, seconds: float,
                method: str = "POST") -> list[float]:
    """`concurrency` keep-alive connections, each sending the same pre-built request back to back (as
    wrk does): a Python HTTP client would cost more CPU than the server it measures."""
    host, port = address.split(":")
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": address, "Content-Length": str(len(body)), **headers}.items())
    request = f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode() + body
    latencies: list[float] = []

    async def worker(until: float, record: bool) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < until:
                start = time.perf_counter()
                writer.write(request)
                status, _ = await _response(reader)
                if status != 200:
                    raise RuntimeError(f"{path}: HTTP {status}")
                if record:
                    latencies.append(time.perf_counter() - start)
        finally:
            writer.close()

    warm = time.perf_counter() + min(0.5, seconds / 4)
    await asyncio.gather(*(worker(warm, False) for _ in range(concurrency)))
    until = time.perf_counter() + seconds
    await asyncio.gather(*(worker(until, True) for _ in range(concurrency)))
    return latencies


async def _response(reader: asyncio.StreamReader) -> tuple[int | None, bytes]:
    """One HTTP/1.1 response: (status, body), or (None, b"") when the connection closed first."""
    status_line = await reader.readline()
    if not status_line:
        return None, b""
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return int(status_line.split()[1]), await reader.readexactly(length)


def _batches(address: str, model: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(f"http://{address}/metrics").text

    def value(series: str) -> float:
        match = re.search(rf'^{series}{{model="{model}"}} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0

    return value("toolkit_batch_size_sum"), value("toolkit_batch_size_count")


def _server(bundles: list[Path], max_batch: int, *extra: str) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "toolkit.cli", "serve", *map(str, bundles), "--port", str(port), "--provider", "cpu",
               "--max-batch", str(max_batch), *extra]
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


# --- Ray Serve against the native backend ----------------------------------------------------------

RAY_OVERHEAD_TARGET_MS = 2.0  # mlp at concurrency 1, Ray's p50 over the native server's
RAY_BACKENDS = {"native": (), "ray, 1 replica": ("--backend", "ray", "--replicas", "1"),
                "ray, 2 replicas": ("--backend", "ray", "--replicas", "2")}


@dataclass
class RayRow:
    backend: str
    model: str
    concurrency: int
    requests: int
    items_per_s: float
    p50_ms: float
    p99_ms: float


def ray_load(bundles: dict[str, Path], *, seconds: float = 3.0, concurrency=(1, 32)) -> tuple[list[RayRow], dict[str, float]]:
    """Each backend in turn, one server at a time (batching on): rows, and what the way in costs alone,
    with no model replica involved: /v2/health/live, its p50 in ms at concurrency 1 ("<backend> p50")
    and its req/s at the highest concurrency ("<backend>", the ceiling of Ray's proxy and ingress)."""
    from toolkit.runtime.model import Model

    requests = {name: _request(Model(path, provider="cpu")) for name, path in bundles.items()}
    rows, ceiling = [], {}
    for backend, flags in RAY_BACKENDS.items():
        process, address = _server(list(bundles.values()), 32, *flags)
        try:
            for name in bundles:
                body, headers, _ = requests[name]
                for c in concurrency:
                    latencies = asyncio.run(_load(address, f"/v2/models/{name}/infer", body, headers, c, seconds))
                    rows.append(RayRow(backend, name, c, len(latencies), len(latencies) / seconds,
                                       float(np.percentile(latencies, 50) * 1000), float(np.percentile(latencies, 99) * 1000)))
                    print(f"  {backend} {name} c={c}: {rows[-1].items_per_s:,.0f}/s p50 {rows[-1].p50_ms:.2f} ms", file=sys.stderr)
            probes = asyncio.run(_load(address, "/v2/health/live", b"", {}, 1, seconds, method="GET"))
            ceiling[f"{backend} p50"] = float(np.percentile(probes, 50) * 1000)
            if backend != "native":
                probes = asyncio.run(_load(address, "/v2/health/live", b"", {}, max(concurrency), seconds, method="GET"))
                ceiling[backend] = len(probes) / seconds
        finally:
            process.send_signal(signal.SIGINT)  # the Ray backend stops the instance it started on SIGINT/SIGTERM
            process.wait(60)
    return rows, ceiling


def ray_markdown(rows: list[RayRow], ceiling: dict[str, float], cpus: int) -> str:
    def row(backend: str, model: str, c: int) -> RayRow:
        return next(r for r in rows if (r.backend, r.model, r.concurrency) == (backend, model, c))

    lines = [
        "## Serving on Ray",
        "",
        f"Written by `python benchmarks/serve_load.py --ray` on {cpus} CPUs: `toolkit serve` with the native backend, then "
        "`--backend ray --replicas 1` and `--replicas 2` (a local Ray instance sized to the machine, the CPUs shared among "
        "the replicas), one server at a time, batching on (`--max-batch 32`); clients as in \"Serving\" (one row per "
        "request, Triton binary tensors, keep-alive connections).",
        "",
        "| model | concurrency | " + " | ".join(f"{b} req/s (p50 / p99 ms)" for b in RAY_BACKENDS) + " |",
        "|---|---|" + "---|" * len(RAY_BACKENDS),
    ]
    for model in dict.fromkeys(r.model for r in rows):
        for c in sorted({r.concurrency for r in rows}):
            cells = [row(b, model, c) for b in RAY_BACKENDS]
            lines.append(f"| {model} | {c} | " + " | ".join(f"{r.items_per_s:,.0f} ({r.p50_ms:.2f} / {r.p99_ms:.2f})" for r in cells) + " |")
    native, ray_one = row("native", "mlp", 1), row("ray, 1 replica", "mlp", 1)
    added = ray_one.p50_ms - native.p50_ms
    top = max(r.concurrency for r in rows)
    lines += ["", f"- Ray's per-request overhead, mlp at concurrency 1: p50 {ray_one.p50_ms:.2f} ms against the native "
              f"{native.p50_ms:.2f} ms, +{added:.2f} ms (goal < {RAY_OVERHEAD_TARGET_MS:.0f} ms): "
              f"{'met' if added < RAY_OVERHEAD_TARGET_MS else 'not met'}. A request crosses two Ray hops the native server "
              "does not have: Ray's HTTP proxy to the ingress replica, and the ingress to the model replica through a "
              f"deployment handle. The first alone, /v2/health/live at concurrency 1 (no model): p50 "
              f"{ceiling['ray, 1 replica p50']:.2f} ms on Ray against {ceiling['native p50']:.2f} ms native."]
    for model in dict.fromkeys(r.model for r in rows):
        one = row("ray, 1 replica", model, top).items_per_s
        two = row("ray, 2 replicas", model, top).items_per_s
        gate = min(v for k, v in ceiling.items() if not k.endswith(" p50"))
        lines.append(f"- {model}, concurrency {top}: 2 replicas give {two / one:.2f}× the throughput of 1 on these {cpus} CPUs, "
                     f"which both replicas and Ray's own processes share. Projection for 2 replicas on 2 such machines: "
                     f"min(2 × {one:,.0f}, proxy-and-ingress ceiling {gate:,.0f}) = {min(2 * one, gate):,.0f} req/s, assuming "
                     "each replica gets the CPUs one replica had here, and one ingress replica (its ceiling: /v2/health/live "
                     f"at concurrency {top}, no model involved) stays in front.")
    return "\n".join(lines) + "\n"


# --- soak: good requests mixed with hostile clients -------------------------------------------------

SOAK_MIX = {"good": 0.6, "malformed": 0.1, "oversized": 0.1, "slow": 0.1, "disconnect": 0.1}
SOAK_BODY_MB = 1  # the server's --max-body-mb in the soak, so that an oversized body costs the clients little


@dataclass
class SoakCounts:
    sent: dict[str, int]
    correct: int = 0
    wrong: int = 0  # a good request answered with other values or status, a bad one with anything but its 4xx
    lost: dict[str, int] | None = None  # no answer where one was due (connection reset, timeout), by kind
    refused: int = 0  # 503: admission or queue full (an answer, not a loss)
    latencies: list[float] | None = None


async def _exchange(host: str, port: int, payload: bytes, *, pause_after: int | None = None, pause_s: float = 0.0,
                    hang_up: bool = False) -> tuple[int | None, bytes]:
    """One request on its own connection: (status, body), or (None, b"") when there is no answer.
    `pause_after` bytes are sent, then the rest after `pause_s` (a slow sender), or never (`hang_up`)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        try:
            if pause_after is None:
                writer.write(payload)
            else:
                writer.write(payload[:pause_after])
                await writer.drain()
                if hang_up:
                    return None, b""
                await asyncio.sleep(pause_s)
                writer.write(payload[pause_after:])
            await writer.drain()
        except ConnectionError:  # the server answered early (413 on the declared length) and closed: read what it said
            pass
        return await asyncio.wait_for(_response(reader), 30)
    except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
        return None, b""
    finally:
        writer.close()


def _http(address: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": address, "Content-Length": str(len(body)), "Connection": "close", **headers}.items())
    return f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + body


async def _mixed(address: str, goods: list[tuple[bytes, dict[str, str], np.ndarray]], mix: dict[str, float], concurrency: int, seconds: float,
                 seed: int = 0) -> SoakCounts:
    host, port = address.split(":")
    path = "/v2/models/mlp/infer"
    malformed = _http(address, path, b'{"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": [NaN]}]}', {})
    oversized = _http(address, path, b"{" + b" " * (SOAK_BODY_MB << 20) + b"}", {})
    counts = SoakCounts(sent=dict.fromkeys(mix, 0), latencies=[], lost={})
    kinds, weights = list(mix), list(mix.values())

    def judge(kind: str, status: int | None, body: bytes, expected: np.ndarray | None) -> None:
        if kind == "disconnect":
            return
        if status is None:
            counts.lost[kind] = counts.lost.get(kind, 0) + 1
        elif status == 503:
            counts.refused += 1
        elif kind in ("good", "slow"):
            ok = status == 200 and _output(body, expected.shape) is not None and np.allclose(_output(body, expected.shape), expected, rtol=1e-4, atol=1e-5)
            counts.correct, counts.wrong = counts.correct + ok, counts.wrong + (not ok)
        else:
            ok = status == {"malformed": 400, "oversized": 413}[kind] and b'"error"' in body
            counts.correct, counts.wrong = counts.correct + ok, counts.wrong + (not ok)

    async def worker(index: int, until: float) -> None:
        rng = np.random.default_rng(seed * 1000 + index)
        while time.perf_counter() < until:
            kind = kinds[rng.choice(len(kinds), p=weights)]
            counts.sent[kind] += 1
            body, headers, expected = goods[int(rng.integers(len(goods)))]
            good = _http(address, path, body, headers)
            start = time.perf_counter()
            if kind == "good":
                status, answer = await _exchange(host, int(port), good)
                if status == 200:
                    counts.latencies.append(time.perf_counter() - start)
            elif kind == "slow":
                status, answer = await _exchange(host, int(port), good, pause_after=len(good) // 3, pause_s=float(rng.uniform(0.5, 2.0)))
            elif kind == "disconnect":
                status, answer = await _exchange(host, int(port), good, pause_after=len(good) // 2, hang_up=True)
            else:
                status, answer = await _exchange(host, int(port), malformed if kind == "malformed" else oversized)
            judge(kind, status, answer, expected)

    until = time.perf_counter() + seconds
    await asyncio.gather(*(worker(i, until) for i in range(concurrency)))
    return counts


def _output(body: bytes, shape: tuple[int, ...]) -> np.ndarray | None:
    """The binary output at the end of a response whose JSON header asked for binary_data_output."""
    size = int(np.prod(shape)) * 4
    return np.frombuffer(body[-size:], dtype="<f4").reshape(shape) if len(body) > size else None


def soak(bundle: Path, *, seconds: float = 60.0, clean_seconds: float = 20.0, concurrency: int = 64) -> dict:
    """`toolkit serve` (its own process) under `concurrency` clients for `seconds`, mixing good
    requests with malformed, oversized, slow-sending and disconnecting ones (SOAK_MIX), after a
    clean run of good requests only; the server's RSS before, between and after."""
    import psutil

    from toolkit.runtime.model import Model

    model = Model(bundle, provider="cpu")
    goods = []
    for seed in range(16):
        body, headers, feeds = _request(model, seed)
        goods.append((body, headers, model.run(feeds)["logits"]))
    process, address = _server([bundle], 32, "--max-body-mb", str(SOAK_BODY_MB))
    try:
        server = psutil.Process(process.pid)
        asyncio.run(_mixed(address, goods, {"good": 1.0}, concurrency, 3.0))  # warm-up
        rss = {"before": server.memory_info().rss}
        clean = asyncio.run(_mixed(address, goods, {"good": 1.0}, concurrency, clean_seconds, seed=1))
        rss["after clean"] = server.memory_info().rss
        soaked = asyncio.run(_mixed(address, goods, SOAK_MIX, concurrency, seconds, seed=2))
        time.sleep(2.0)  # slow senders' last requests finish
        rss["after soak"] = server.memory_info().rss
        alive = process.poll() is None
    finally:
        process.terminate()
        process.wait(30)

    def summary(counts: SoakCounts) -> dict:
        lat = counts.latencies or [float("nan")]
        return {"sent": counts.sent, "sent_total": sum(counts.sent.values()), "correct": counts.correct, "wrong": counts.wrong,
                "lost": sum(counts.lost.values()), "lost_by_kind": counts.lost, "refused_503": counts.refused, "good_answered": len(counts.latencies or []),
                "p50_ms": float(np.percentile(lat, 50) * 1000), "p99_ms": float(np.percentile(lat, 99) * 1000)}

    return {"seconds": seconds, "clean_seconds": clean_seconds, "concurrency": concurrency, "mix": SOAK_MIX, "body_limit_mb": SOAK_BODY_MB,
            "clean": summary(clean), "soak": summary(soaked), "rss_mb": {k: round(v / 2**20, 1) for k, v in rss.items()},
            "server_alive": alive}


def soak_markdown(result: dict) -> str:
    clean, soaked, rss = result["clean"], result["soak"], result["rss_mb"]
    mix = ", ".join(f"{k} {v:.0%}" for k, v in result["mix"].items())
    lines = [
        "## Serving under hostile traffic",
        "",
        f"Written by `python benchmarks/serve_load.py --soak`: `toolkit serve` (mlp, CPU, `--max-body-mb {result['body_limit_mb']}`) in "
        f"its own process; {result['concurrency']} clients over loopback, each request on its own connection. A clean run of good "
        f"requests only ({result['clean_seconds']:.0f} s), then {result['seconds']:.0f} s of a mix: {mix}. Good: a binary-tensor request "
        "whose output is checked against the runtime; malformed: a NaN token (400 due); oversized: a body past the limit (413 due); "
        "slow: a good request whose body stalls 0.5–2 s after its first third; disconnect: half a body, then the client hangs up.",
        "",
        "| run | requests sent | answered correctly | wrong answers | lost | refused (503) | good p50 ms | good p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in (("clean", clean), ("soak", soaked)):
        lines.append(f"| {name} | {run['sent_total']:,} | {run['correct']:,} | {run['wrong']} | {run['lost']} | {run['refused_503']} | "
                     f"{run['p50_ms']:.2f} | {run['p99_ms']:.2f} |")
    lines += ["", f"Sent in the soak, by kind: {', '.join(f'{k} {v:,}' for k, v in soaked['sent'].items())}. "
              f"Good requests' p50 under the soak over the clean run: {soaked['p50_ms'] / clean['p50_ms']:.2f}×, p99 "
              f"{soaked['p99_ms'] / clean['p99_ms']:.2f}× (in the clean run every client sends good requests back to back and "
              "saturates the CPUs; in the soak part of the clients wait on slow sends or send cheap bad requests, so fewer good "
              "ones compete at once: the soak's lower latency is less load, and the point is that bad traffic did not raise it). "
              f"Server RSS: {rss['before']:.0f} MB after warm-up, "
              f"{rss['after clean']:.0f} MB after the clean run, {rss['after soak']:.0f} MB after the soak; the server "
              f"{'was still serving' if result['server_alive'] else 'HAD DIED'} at the end.",
              "",
              f"Targets: wrong answers 0 ({'met' if soaked['wrong'] == 0 and clean['wrong'] == 0 else 'not met'}), lost 0 "
              f"({'met' if soaked['lost'] == 0 and clean['lost'] == 0 else 'not met'})."]
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--soak", action="store_true", help="the server under hostile traffic instead (mlp, 60 s, concurrency 64)")
    parser.add_argument("--soak-seconds", type=float, default=60.0)
    parser.add_argument("--ray", action="store_true", help="the native backend against Ray Serve with 1 and 2 replicas instead")
    args = parser.parse_args(argv)
    if args.ray:
        bundles = {name: args.bundles / name for name in MODELS}
        rows, ceiling = ray_load(bundles, seconds=args.seconds)
        section = ray_markdown(rows, ceiling, len(os.sched_getaffinity(0)))
        write_section(args.out, section)
        (args.out.parent / "serve_ray.json").write_text(json.dumps({"rows": [asdict(r) for r in rows], "ceiling": ceiling}, indent=2) + "\n")
        print(section)
        return 0
    if args.soak:
        if not (args.bundles / "mlp" / "manifest.json").is_file():
            parser.error(f"no bundle at {args.bundles / 'mlp'}: run python benchmarks/run.py first, or toolkit build mlp -o DIR")
        result = soak(args.bundles / "mlp", seconds=args.soak_seconds)
        write_section(args.out, soak_markdown(result))
        (args.out.parent / "serve_soak.json").write_text(json.dumps(result, indent=2) + "\n")
        print(soak_markdown(result))
        return 0
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
