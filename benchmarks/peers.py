"""toolkit against the peers a user would pick instead, on Hugging Face decoders: optimum-onnx's
ORTModelForCausalLM (with its KV cache) and onnxruntime-genai's model builder (fp32, and int4 beside
toolkit's int4 and int8), interleaved in one run on this machine.

The models are seeded-random GPT-2 small and a LLaMA-style model of the same size, built offline from
configs (models/hf_causal.py). Every runtime decodes greedily exactly `new` tokens (end-of-text
ignored, as with transformers' min_new_tokens) from the same 32-token prompts; per row it reports
the time to the first token (a 1-token generation), decode ms per token ((T(new) - T(1)) / (new - 1)),
medians over the rounds, and the share of greedy tokens equal to transformers' own generate().

optimum-onnx pins transformers below 5 and onnxruntime-genai's builder needs 5, so each peer lives in
its own virtual environment, created here on first use, and exchanges only model directories and
timings with this process (benchmarks/peer_worker.py).

    python benchmarks/peers.py      # → benchmarks/peers.json and the "## Peers" section of benchmarks/RESULTS.md
    python benchmarks/peers.py --size tiny --new 8,16 --rounds 1   # the same code in a minute
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_load import write_section  # noqa: E402

from models.hf_causal import causal_lm  # noqa: E402
from toolkit.bench.report import machine  # noqa: E402
from toolkit.runtime.generate import Generator, token_agreement  # noqa: E402

WORKER = Path(__file__).with_name("peer_worker.py")
# Each peer's environment: what pip installs there, besides this process's torch (both trace the same
# ops) and, for optimum, this process's onnxruntime (the same kernels; onnxruntime-genai ships its own).
VENVS = {
    "optimum": ["optimum-onnx", "transformers<5", "onnxruntime=={onnxruntime}"],
    "genai": ["onnxruntime-genai", "onnx_ir", "onnxscript", "transformers>=5"],
}
PEERS = {"optimum": "optimum", "genai-fp32": "genai", "genai-int4": "genai"}  # peer → environment
TOOLKIT_VARIANTS = {"toolkit-fp32": "fp32", "toolkit-opt": "opt", "toolkit-int8": "int8", "toolkit-int4": "int4"}  # fp32: the export as it is; opt: fused
HEAD4 = "toolkit-int4-head4"  # int4 with its LM head in 4 bits as well, like onnxruntime-genai's
PROMPT_TOKENS = 32


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2,llama")
    parser.add_argument("--size", default="small", help="models/hf_causal.py size: small (124M) or tiny")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new", default="64,256", help="new tokens per generation")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TOOLKIT_CACHE", Path.home() / ".cache/toolkit")) / "peers")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "peers.json")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md", help="where the Peers section goes")
    parser.add_argument("--section-only", action="store_true", help="rewrite the Peers section from --out, measuring nothing")
    args = parser.parse_args()
    if args.section_only:
        _write_section(json.loads(args.out.read_text()), args.results)
        return 0
    batches, news = [int(b) for b in args.batches.split(",")], [int(n) for n in args.new.split(",")]
    python = {name: _venv(args.work / "venvs" / name, packages) for name, packages in VENVS.items()}
    rows = []
    for kind in args.models.split(","):
        model_dir = causal_lm(kind, args.size)
        runners = _runners(kind, model_dir, args.work / f"{kind}-{args.size}", python, args.threads)
        try:
            prompts = {b: np.random.default_rng(b).integers(1, 300, size=(b, PROMPT_TOKENS)).tolist() for b in batches}
            for batch in batches:
                reference = _reference(model_dir, prompts[batch], max(news))
                for new in news:
                    rows.extend(_row(kind, batch, new, prompts[batch], reference, runners, args.rounds))
        finally:
            for runner in runners.values():
                runner.close()
    result = {"machine": {"cpu": machine({})["cpu"], "threads": args.threads, "python": platform.python_version()},
              "command": " ".join(["python", "benchmarks/peers.py", *sys.argv[1:]]),
              "settings": {"models": args.models, "size": args.size, "rounds": args.rounds}, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    _write_section(result, args.results)
    return 0


def _write_section(result: dict[str, Any], results: Path) -> None:
    """The "## Peers" section of `results`, from a run's JSON."""
    settings = result["settings"]
    section = "\n".join([
        "## Peers (Hugging Face decoders)", "",
        f"Written by `{result['command']}` ({result['machine']['cpu']}, {result['machine']['threads']} threads for every runtime): "
        f"{settings['models']} of models/hf_causal.py size {settings['size']!r} (seeded, untrained), {PROMPT_TOKENS}-token "
        "prompts, greedy, exactly `new` tokens. Each cell: decode ms/token (time to first token in ms, share of greedy "
        f"tokens equal to transformers' generate()), medians of {settings['rounds']} interleaved rounds. toolkit-fp32 "
        "is the export as it is, toolkit-opt the fused graph; the last column compares decode speed: fp32 against "
        "optimum and onnxruntime-genai fp32, toolkit's int4 (and int8) against onnxruntime-genai's int4. toolkit's int4 "
        f"keeps the LM head at 8 bits; {HEAD4} is the same bundle with the head in 4-bit blocks (`--head int4`), the "
        "precision of onnxruntime-genai's int4. onnxruntime-genai runs on the onnxruntime it installs. A dash: the peer "
        "cannot export that architecture (onnxruntime-genai's builder has no GPT-2).", "",
        markdown(result["rows"]), *([""] + [result["note"]] if result.get("note") else []), ""])
    write_section(results, section)
    print(section)


def _venv(path: Path, packages: list[str]) -> Path:
    """The interpreter of a virtual environment holding `packages` (and this process's torch)."""
    import onnxruntime
    import torch

    wanted = [f"torch=={torch.__version__.split('+')[0]}", *(p.format(onnxruntime=onnxruntime.__version__) for p in packages)]
    marker = path / "toolkit-peer.json"
    if not marker.is_file() or json.loads(marker.read_text()) != wanted:
        print(f"creating {path} with {' '.join(wanted)}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
        subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "-q", *wanted], check=True)
        marker.write_text(json.dumps(wanted))
    return path / "bin" / "python"


class _Peer:
    """A peer's worker process, answering generation requests."""

    def __init__(self, python: Path, peer: str, model_dir: Path, out: Path, threads: int):
        if not out.is_dir():  # exported into a staging directory, so that an interrupted export is redone
            print(f"exporting {model_dir.name} with {peer}", flush=True)
            staging = out.with_name(out.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            subprocess.run([str(python), str(WORKER), "export", peer, str(model_dir), str(staging)], check=True, stdout=subprocess.DEVNULL)
            staging.rename(out)
        self.process = subprocess.Popen([str(python), str(WORKER), "serve", peer, str(out), str(threads)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert json.loads(self.process.stdout.readline())["ready"]

    def generate(self, prompts: list[list[int]], new: int) -> tuple[float, np.ndarray]:
        self.process.stdin.write(json.dumps({"prompts": prompts, "new_tokens": new}) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        return answer["seconds"], np.asarray(answer["tokens"])

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


class _Toolkit:
    """toolkit's Generator over one variant of a bundle built by `toolkit build`."""

    def __init__(self, bundle: Path, variant: str, threads: int):
        self.generator = Generator(bundle, variant=variant, provider="cpu", threads=threads)
        # the peers generate exactly `new` tokens (min_new_tokens): so does toolkit here
        self.generator.layout = dataclasses.replace(self.generator.layout, eos_ids=())

    def generate(self, prompts: list[list[int]], new: int) -> tuple[float, np.ndarray]:
        start = time.perf_counter()
        tokens = np.stack(list(self.generator.tokens(prompts, max_new_tokens=new)), axis=1)
        return time.perf_counter() - start, tokens

    def close(self) -> None:
        pass


def _runners(kind: str, model_dir: Path, work: Path, python: dict[str, Path], threads: int) -> dict[str, Any]:
    from toolkit.bundle import Bundle
    from toolkit.compile import build

    bundle = work / "toolkit"
    say = lambda m: print("  " + m, flush=True)  # noqa: E731
    if not (bundle / "manifest.json").is_file():
        print(f"toolkit build hf:{model_dir} (int8, int4)", flush=True)
        build(f"hf:{model_dir}", bundle, modes=["int8", "int4"], select=False, force=True, progress=say)
    elif "int4" not in Bundle.open(bundle).manifest.variants:  # a bundle built before int4 existed: int4 as build makes it
        from toolkit.compile import check, quantize

        quantize(bundle, mode="int4", source="opt", progress=say, trust_source=True)
        check(bundle, variants=["int4"], progress=say, trust_source=True)
    passed = {n for n, v in Bundle.open(bundle).manifest.variants.items() if v.parity and v.parity["passed"]}
    runners: dict[str, Any] = {label: _Toolkit(bundle, variant, threads) for label, variant in TOOLKIT_VARIANTS.items() if variant in passed}
    if "int4" in passed:
        runners[HEAD4] = _Toolkit(_with_four_bit_head(bundle, work / "toolkit-head4", say), "int4", threads)
    for peer, venv in PEERS.items():
        try:
            runners[peer] = _Peer(python[venv], peer, model_dir, work / peer, threads)
        except subprocess.CalledProcessError:  # onnxruntime-genai's builder knows a list of architectures (not GPT-2)
            print(f"{peer} cannot export {kind}: left out of its rows", flush=True)
    return runners


def _with_four_bit_head(bundle: Path, target: Path, say: Any) -> Path:
    """A copy of `bundle` whose int4 packs the LM head in 4-bit blocks too (`--head int4`), as
    onnxruntime-genai's int4 does: the same precision as that peer, where toolkit's default keeps
    the head at 8 bits."""
    from toolkit.compile import check, quantize

    if not (target / "manifest.json").is_file():
        print("toolkit int4 with a 4-bit head (as onnxruntime-genai's int4)", flush=True)
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(bundle, partial)
        quantize(partial, mode="int4", source="opt", head="int4", progress=say, trust_source=True)
        check(partial, variants=["int4"], progress=say, trust_source=True)
        partial.rename(target)
    return target


def _reference(model_dir: Path, prompts: list[list[int]], new: int) -> np.ndarray:
    """transformers' own greedy continuation (fp32, eager attention)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()


def _row(kind: str, batch: int, new: int, prompts: list[list[int]], reference: np.ndarray, runners: dict[str, Any],
         rounds: int) -> list[dict[str, Any]]:
    """Every runner at one shape, interleaved: each round runs them all in turn, starting one further on."""
    first: dict[str, list[float]] = {name: [] for name in runners}
    decode: dict[str, list[float]] = {name: [] for name in runners}
    tokens: dict[str, np.ndarray] = {}
    names = list(runners)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t1, _ = runners[name].generate(prompts, 1)
            tn, tokens[name] = runners[name].generate(prompts, new)
            first[name].append(t1)
            decode[name].append((tn - t1) / (new - 1))
    out = []
    for name in names:
        agreement = token_agreement(tokens[name], reference[:, :new])
        out.append({"model": kind, "batch": batch, "new_tokens": new, "runtime": name, "ttft_ms": 1e3 * float(np.median(first[name])),
                    "decode_ms_per_token": 1e3 * float(np.median(decode[name])), "token_agreement": agreement["token_agreement"]})
        print(f"{kind} batch {batch} new {new} {name}: ttft {out[-1]['ttft_ms']:.1f} ms, decode {out[-1]['decode_ms_per_token']:.2f} "
              f"ms/token, agreement {agreement['token_agreement']:.3f}", flush=True)
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    """One line per model and shape: each runtime's decode ms/token (time to first token, agreement)."""
    names = list(dict.fromkeys(r["runtime"] for r in rows))
    lines = ["| model | batch | new | " + " | ".join(names) + " | toolkit's best ÷ best peer (decode) |",
             "|---|---|---|" + "---|" * (len(names) + 1)]
    for key in dict.fromkeys((r["model"], r["batch"], r["new_tokens"]) for r in rows):
        cells = {r["runtime"]: r for r in rows if (r["model"], r["batch"], r["new_tokens"]) == key}
        text = [f"{c['decode_ms_per_token']:.2f} ({c['ttft_ms']:.0f}, {c['token_agreement']:.2f})" if (c := cells.get(n)) else "-"
                for n in names]
        ratios = []
        for label, ours, theirs in (("fp32", ("toolkit-fp32", "toolkit-opt"), ("optimum", "genai-fp32")),
                                    ("int4", ("toolkit-int4",), ("genai-int4",)), ("int4 with a 4-bit head", (HEAD4,), ("genai-int4",)),
                                    ("int8 vs int4", ("toolkit-int8",), ("genai-int4",))):
            mine = [cells[o]["decode_ms_per_token"] for o in ours if o in cells]
            peers = [cells[p]["decode_ms_per_token"] for p in theirs if p in cells]
            if mine and peers:
                ratios.append(f"{label} {min(mine) / min(peers):.2f}×")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(text) + f" | {', '.join(ratios)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
