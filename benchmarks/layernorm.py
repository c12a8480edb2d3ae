"""SkipLayerNormalization against the Add (+ bias Add) + LayerNormalization it fuses, on onnxruntime's
CPU provider, side by side in interleaved rounds over the widths and row counts of the reference
transformers and larger ones. It backs the choice that CPU sessions and CPU-made `opt` variants keep
the two apart (toolkit.runtime.session.CPU_DISABLED_OPTIMIZERS, toolkit.compile.passes.skip_layer_norm).

    python benchmarks/layernorm.py     # writes the "## Kernel choices" section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from serve_load import write_section  # noqa: E402

ROWS = (32, 1024)  # batch × seq: gpt and encoder at batch 1 and 32, seq 32
WIDTHS = (128, 256, 384, 768, 1024)


def _model(fused: bool, rows: int, width: int):
    from onnx import TensorProto, helper, numpy_helper

    from toolkit._onnx import IR_VERSION_CAP

    if fused:
        nodes = [helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"], ["y"],
                                  domain="com.microsoft", epsilon=1e-5)]
    else:
        nodes = [helper.make_node("Add", ["x", "skip"], ["partial"]), helper.make_node("Add", ["partial", "bias"], ["total"]),
                 helper.make_node("LayerNormalization", ["total", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5)]
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        nodes, "layernorm", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, rows, width]) for n in ("x", "skip")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, width])],
        [numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), n) for n in ("gamma", "beta", "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = IR_VERSION_CAP
    return model.SerializeToString()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-time", type=float, default=0.5, help="seconds per candidate and shape")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from toolkit.bench.measure import measure, ort_step
    from toolkit.runtime.session import new_session

    threads = len(os.sched_getaffinity(0))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    lines = [
        "## Kernel choices",
        "",
        f"Written by `python benchmarks/layernorm.py`: onnxruntime {ort.__version__}, CPU provider, {threads} threads, "
        "p50 in µs, the two graphs timed in interleaved rounds. The split graph is what CPU sessions run "
        "(SkipLayerNormFusion off) and what `toolkit optimize --provider cpu` writes.",
        "",
        "| rows | width | SkipLayerNormalization | Add + Add + LayerNormalization | fused ÷ split |",
        "|---|---|---|---|---|",
    ]
    rng = np.random.default_rng(0)
    for rows in ROWS:
        for width in WIDTHS:
            feeds = {n: rng.standard_normal((1, rows, width)).astype(np.float32) for n in ("x", "skip")}
            steps = {name: ort_step(new_session(_model(name == "fused", rows, width), "cpu", options), feeds, "cpu")
                     for name in ("fused", "split")}
            latencies, _ = measure(steps, max_time=2 * args.max_time, rounds=5, warmup=20)
            fused, split = (float(np.median(latencies[n])) * 1e6 for n in ("fused", "split"))
            lines.append(f"| {rows} | {width} | {fused:.1f} | {split:.1f} | {fused / split:.2f} |")
            print(lines[-1], file=sys.stderr)
    section = "\n".join(lines) + "\n"
    write_section(args.out, section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
