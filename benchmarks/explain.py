"""Do the explanations mean something, and what do they cost? For each method on the ONNX session
(`toolkit.explain`), on the trained digits MLP and CNN and the zoo's text encoder:

- agreement: the largest difference from Captum's implementation of the same method on the PyTorch
  model (same windows, same orderings, same baseline), relative to the largest attribution;
- faithfulness (the deletion curve): the mean probability of the explained class as the most
  attributed features go to the baseline first, as a share of the same with random orders (lower
  is better; 1 is no better than chance);
- sanity (Adebayo et al. 2018): the rank correlation with the attributions of the same network with
  every weight shuffled (near 0: the explanation depends on what the model learned);
- cost: time per explained row, toolkit on onnxruntime against Captum on torch eager, both running
  their perturbations 64 at a time.

    python benchmarks/explain.py          # → "## Explain: agreement, faithfulness, sanity, cost" in RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from serve_load import write_section  # noqa: E402

ROWS = 8
CHUNK = 64
SAMPLES = 8


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "explain.json")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in ("mlp", "cnn", "encoder"):
            rows += _measure(name, Path(work))
    result = {"command": " ".join(["python benchmarks/explain.py", *sys.argv[1:]]), "cpus": len(os.sched_getaffinity(0)), "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _write_section(result, args.results)
    return 0


def _setup(name: str, work: Path) -> tuple[Path, Any, dict[str, np.ndarray], str, dict[str, dict[str, Any]], np.ndarray | None]:
    """(bundle, PyTorch module, feeds, input explained, each method's options, the features the
    deletion curve removes)."""
    from toolkit.attribution import patch_mask
    from toolkit.bundle import Bundle
    from toolkit.compile.exporter import export
    from toolkit.reference.source import bundle_reference
    from toolkit.runtime.samples import make_feeds

    bundle = export(name, work / name, preset="tiny" if name == "encoder" else "default").path
    spec = bundle_reference(Bundle.open(bundle))
    if name == "encoder":
        feeds = make_feeds(spec.inputs, {"batch": ROWS, "seq": 16}, 0)
        return bundle, spec.module.eval(), feeds, "input_ids", {"occlusion": {}, "shapley": {"samples": SAMPLES}}, None
    feeds = {k: v[:ROWS] for k, v in spec.eval_data()[0].items()}
    input_name = next(iter(feeds))
    if name == "mlp":
        groups = (np.arange(784) // 16).astype(np.int64)
        return bundle, spec.module.eval(), feeds, input_name, {"occlusion": {"window": (16,), "strides": (16,)},
                                                              "shapley": {"feature_mask": groups, "samples": SAMPLES}}, groups
    patches = patch_mask((1, 28, 28), 4)
    return bundle, spec.module.eval(), feeds, input_name, {"occlusion": {"window": (1, 4, 4), "strides": (1, 2, 2)},
                                                          "shapley": {"feature_mask": patches, "samples": SAMPLES}}, patches


def _measure(name: str, work: Path) -> list[dict[str, Any]]:
    import torch

    from toolkit.attribution import explain
    from toolkit.attribution.drift import rank_correlation
    from toolkit.runtime.model import Model

    bundle, module, feeds, input_name, methods, groups = _setup(name, work)
    model = Model(bundle, provider="cpu")
    shuffled = Model(_shuffled(bundle, work), provider="cpu")
    rows = []
    for method, options in methods.items():
        torch.manual_seed(0)
        orderings = [torch.randperm(_features(options, feeds[input_name])).tolist() for _ in range(SAMPLES)] if method == "shapley" else None
        extra = {"permutations": orderings} if orderings else {}
        one = {k: v[:1] for k, v in feeds.items()}  # warm both up first: the first call pays for allocations
        _captum(method, module, one, input_name, explain(model, one, method=method, chunk=CHUNK, **options, **extra).target, options)
        start = time.perf_counter()
        ours = explain(model, feeds, method=method, chunk=CHUNK, **options, **extra)
        ours_s = (time.perf_counter() - start) / ROWS
        start = time.perf_counter()
        theirs = _captum(method, module, feeds, input_name, ours.target, options)
        theirs_s = (time.perf_counter() - start) / ROWS
        mine = ours.attributions[input_name]
        random = explain(shuffled, feeds, method=method, target=ours.target, chunk=CHUNK, **options, **extra).attributions[input_name]
        rows.append({
            "model": name, "method": method,
            "agreement": float(np.abs(mine - theirs).max() / np.abs(theirs).max()),
            "faithfulness": None if groups is None else _deletion(model, feeds, input_name, ours, groups),
            "sanity": float(np.mean([rank_correlation(mine[r], random[r]) for r in range(ROWS)])),
            "ms_per_row": ours_s * 1000, "captum_ms_per_row": theirs_s * 1000,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _features(options: dict[str, Any], value: np.ndarray) -> int:
    mask = options.get("feature_mask")
    return int(np.unique(mask).size) if mask is not None else int(np.prod(value.shape[1:]))


def _captum(method: str, module: Any, feeds: dict[str, np.ndarray], input_name: str, target: np.ndarray, options: dict[str, Any]) -> np.ndarray:
    import torch
    from captum.attr import Occlusion, ShapleyValueSampling

    torch.manual_seed(0)
    common: dict[str, Any] = {"target": torch.from_numpy(target), "baselines": 0.0, "perturbations_per_eval": CHUNK}
    if input_name == "input_ids":  # a token is removed through the mask: Captum attributes a presence input that multiplies it
        ids, mask = torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])

        def forward(presence: Any, ids: Any, mask: Any) -> Any:
            return module(ids, (mask * presence).long())

        inputs, common["additional_forward_args"] = torch.ones(ids.shape), (ids, mask)
    else:
        forward, inputs = module, torch.from_numpy(feeds[input_name])
    with torch.no_grad():
        if method == "occlusion":
            window = options.get("window", (1,))
            return Occlusion(forward).attribute(inputs, sliding_window_shapes=window, strides=options.get("strides", window), **common).numpy()
        mask = options.get("feature_mask")
        return ShapleyValueSampling(forward).attribute(inputs, n_samples=SAMPLES, feature_mask=None if mask is None else torch.from_numpy(mask)[None],
                                                       **common).numpy()


def _deletion(model: Any, feeds: dict[str, np.ndarray], input_name: str, explanation: Any, mask: np.ndarray) -> float:
    """Area under the explained class's probability as the features of `mask` go to 0, most
    attributed first (a feature's mean attribution), as a share of the mean area over 5 random
    orders; averaged over the rows."""
    value = feeds[input_name]
    rng = np.random.default_rng(0)
    shares = []
    for row, target in enumerate(explanation.target):
        credit = np.array([explanation.attributions[input_name][row][mask == f].mean() for f in np.unique(mask)])

        def area(order: np.ndarray, row: int = row, target: int = target) -> float:
            steps = [value[row].copy()]
            for feature in order:
                steps.append(np.where(mask == feature, 0.0, steps[-1]).astype(value.dtype))
            logits = model.run({input_name: np.stack(steps)})[model.outputs[0].name]
            probability = np.exp(logits - logits.max(1, keepdims=True))
            return float((probability / probability.sum(1, keepdims=True))[:, target].mean())

        shares.append(area(np.argsort(-credit)) / np.mean([area(rng.permutation(len(credit))) for _ in range(5)]))
    return float(np.mean(shares))


def _shuffled(bundle: Path, work: Path) -> Path:
    import onnx
    from onnx import numpy_helper

    from toolkit.bundle import Bundle

    target = work / f"{bundle.name}-shuffled"
    shutil.copytree(bundle, target)
    opened = Bundle.open(target)
    proto = onnx.load(str(opened.variant_path("fp32")))
    rng = np.random.default_rng(0)
    for tensor in proto.graph.initializer:
        values = numpy_helper.to_array(tensor)
        if values.size > 16 and values.dtype.kind == "f":
            tensor.CopyFrom(numpy_helper.from_array(rng.permutation(values.ravel()).reshape(values.shape), tensor.name))
    onnx.save(proto, work / "shuffled.onnx")
    opened.add_variant("fp32", work / "shuffled.onnx", recipe={"stage": "shuffled", "options": {}, "parent": None}, precision="fp32")
    return target


def _write_section(result: dict[str, Any], results: Path) -> None:
    title = "## Explain: agreement, faithfulness, sanity, cost"
    lines = [title, "", f"Written by `{result['command']}` ({result['cpus']} CPUs; {ROWS} rows per model, held-out digits for the MLP and "
             f"CNN, sample token ids for the zoo's text encoder; Shapley sampling with {SAMPLES} orderings). *agreement*: the largest "
             "difference from Captum's same method on the PyTorch model, relative to the largest attribution. *faithfulness*: the "
             "deletion curve's area, most attributed features first, as a share of random orders' (lower is better). *sanity*: the "
             "rank correlation with the same network with every weight shuffled (near 0 is right). *cost*: per explained row, "
             f"both running {CHUNK} perturbations per call.", "",
             "| model | method | agreement with Captum | faithfulness | sanity | toolkit ms/row | Captum ms/row | Captum / toolkit |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        faithful = "–" if row["faithfulness"] is None else f"{row['faithfulness']:.2f}"
        lines.append(f"| {row['model']} | {row['method']} | {row['agreement']:.1e} | {faithful} | {row['sanity']:+.2f} | "
                     f"{row['ms_per_row']:.1f} | {row['captum_ms_per_row']:.1f} | {row['captum_ms_per_row'] / row['ms_per_row']:.1f}x |")
    lines += ["", "The text encoder is the zoo's seeded (untrained) one: its rows say that tokens are removed as Captum removes them "
              "through a presence input that multiplies the mask, and what it costs; faithfulness needs a trained text classifier. "
              "The cost goal (issue 42: at most half Captum's time) holds where the model does real work per call (the CNN); on the "
              "MLP and the tiny encoder, whose calls take a fraction of a millisecond, both sides spend their time around the model "
              "and toolkit is 1.1-1.5x faster, not 2x: not profiled yet."]
    write_section(results, "\n".join(lines) + "\n\n")


if __name__ == "__main__":
    raise SystemExit(main())
