"""Which Hugging Face architectures toolkit takes, side by side with optimum-onnx: every seeded tiny
model of models/hf_heads.py and models/hf_causal.py (built offline from configs) through toolkit's
`build` (export, check of every variant, without timing) and, for a model that generates, the
Generator on its fp32 graph against transformers' own greedy `generate()`; and through optimum's
exporter (`optimum.exporters.onnx`, which validates its export against PyTorch at its default
tolerance) with the task a user would name, in its own virtual environment (benchmarks/peers.py:
optimum-onnx pins transformers below 5).

    python benchmarks/breadth.py          # → the "## Breadth" section of benchmarks/RESULTS.md
    python benchmarks/breadth.py --models t5,whisper --no-optimum
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from peers import VENVS, _venv  # noqa: E402
from serve_load import write_section  # noqa: E402

from models.hf_causal import ARCHITECTURES, causal_lm  # noqa: E402
from models.hf_heads import KINDS, hf_model  # noqa: E402

# the task a user names to optimum for each model (optimum cannot infer it for a local directory)
OPTIMUM_TASKS = {
    "bert-sequence": "text-classification", "bert-regression": "text-classification", "bert-token": "token-classification",
    "bert-masked": "fill-mask", "bert-answer": "question-answering", "roberta-token": "token-classification",
    "distilbert-sequence": "text-classification", "vit": "image-classification", "resnet": "image-classification",
    "convnext": "image-classification", "bart": "text2text-generation-with-past", "t5": "text2text-generation-with-past",
    "whisper": "automatic-speech-recognition-with-past", **{kind: "text-generation-with-past" for kind in ARCHITECTURES},
}
NEW_TOKENS = 16


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join([*KINDS, *ARCHITECTURES]))
    parser.add_argument("--no-optimum", action="store_true", help="toolkit's columns only")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TOOLKIT_CACHE", Path.home() / ".cache/toolkit")) / "peers")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    optimum = None if args.no_optimum else _venv(args.work / "venvs" / "optimum", VENVS["optimum"])
    rows = []
    for kind in args.models.split(","):
        path = causal_lm(kind) if kind in ARCHITECTURES else hf_model(kind)
        row = {"model": kind, "architecture": _architecture(path), **_toolkit(path)}
        if optimum is not None:
            row["optimum"] = _optimum(optimum, path, OPTIMUM_TASKS[kind])
        print(row, flush=True)
        rows.append(row)
    command = "python benchmarks/breadth.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    section = "\n".join([
        "## Breadth (Hugging Face architectures)", "",
        f"Written by `{command}`: seeded tiny models built offline from configs (models/hf_heads.py, models/hf_causal.py). "
        "toolkit: `build` without timing (export; check of fp32, the fused `opt`, int8, fp16 and, where it applies, int8-static, "
        "each against its gates; a variant that fails is named), and for generating models the share of greedy tokens "
        f"({NEW_TOKENS} new, 3 prompts) equal to transformers' `generate()`. optimum: `optimum.exporters.onnx` with the task "
        "named, which validates the export against PyTorch (✓: exported and validated).", "",
        "| model | architecture | toolkit task | build (s) | variants passing | failed | greedy = transformers | optimum |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {r['model']} | {r['architecture']} | {r.get('task', '—')} | {r.get('seconds', '—')} | {r.get('passed', '—')} | "
          f"{r.get('failed', '—')} | {r.get('greedy', '—')} | {r.get('optimum', 'not run')} |" for r in rows), ""])
    write_section(args.results, section)
    print(section)
    return 0


def _architecture(path: Path) -> str:
    import json

    return json.loads((path / "config.json").read_text())["architectures"][0]


def _toolkit(path: Path) -> dict[str, Any]:
    from toolkit.compile.pipeline import build
    from toolkit.errors import ToolkitError
    from toolkit.runtime.describe import missed_gates

    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        try:
            bundle = build(f"hf:{path}", Path(work) / "bundle", select=False)
        except ToolkitError as exc:
            return {"passed": "✗ " + str(exc).split("\n")[0][:120]}
        manifest = bundle.manifest
        passed = [name for name, variant in manifest.variants.items() if (variant.parity or {}).get("passed")]
        failed = [f"{name} ({missed_gates(variant.parity or {})[:90]})" for name, variant in manifest.variants.items() if name not in passed]
        failed += [f"{name} ({why.splitlines()[0][:90]})" for name, why in manifest.failed.items()]
        row = {"task": manifest.task, "seconds": f"{time.perf_counter() - start:.0f}", "passed": ", ".join(passed),
               "failed": "; ".join(failed) or "none"}
        if manifest.task == "generate":
            row["greedy"] = f"{_greedy_agreement(bundle.path, path):.2f}"
        return row


def _greedy_agreement(bundle: Path, path: Path) -> float:
    """Share of greedy tokens of the fp32 graph equal to transformers' generate(), per prompt alone."""
    import torch
    import transformers

    from toolkit import Generator
    from toolkit.runtime.generate import greedy_tokens, token_agreement

    generator = Generator(bundle, provider="cpu")
    layout = generator.layout
    if layout.features:
        from toolkit.reference.hf import hf_spec

        model = transformers.AutoModelForSpeechSeq2Seq.from_pretrained(path, attn_implementation="eager").eval()
        prompts = list(hf_spec(path).parts[layout.encoder].sample_data(3)["input_features"])
        skip = 0
    else:
        auto = transformers.AutoModelForSeq2SeqLM if layout.encoder else transformers.AutoModelForCausalLM
        model = auto.from_pretrained(path, attn_implementation="eager").eval()
        prompts = [generator.tokenizer.encode(p, special_tokens=bool(layout.encoder))
                   for p in ("Return the value of", "If the", "Raise ValueError when the argument is not a")]
        skip = len(layout.decoder_start) if layout.encoder else None
    shares = []
    for prompt in prompts:
        source = torch.from_numpy(prompt[None]) if layout.features else torch.tensor([prompt])
        want = model.generate(source, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1, pad_token_id=layout.eos_token_id).numpy()
        want = want[:, (len(prompt) if skip is None else skip):]
        got = greedy_tokens(generator, [prompt], NEW_TOKENS)
        ends = [i for i, t in enumerate(want[0]) if t in layout.eos_ids]
        width = ends[0] + 1 if ends else want.shape[1]
        shares.append(token_agreement(got[:, :width], want[:, :width])["token_agreement"])
    return float(np.mean(shares))


def _optimum(python: Path, path: Path, task: str) -> str:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = subprocess.run([str(python), "-m", "optimum.exporters.onnx", "--model", str(path), "--task", task, out],
                                capture_output=True, text=True)
        if result.returncode == 0:
            return f"✓ ({time.perf_counter() - start:.0f} s)"
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        return "✗ " + (lines[-1][:120] if lines else f"exit {result.returncode}")


if __name__ == "__main__":
    raise SystemExit(main())
