"""The peer side of benchmarks/peers.py, run by a peer's own interpreter (its virtual environment):
exports a model directory with the peer's tool, then answers timing requests, one JSON object per
line on stdin → one per line on stdout. It imports nothing from toolkit.

    python peer_worker.py export optimum|genai-fp32|genai-int4 MODEL_DIR OUT_DIR
    python peer_worker.py export-encoder MODEL_DIR OUT_DIR    (optimum: fp32, O2, O3 and int8 of a sentence encoder)
    python peer_worker.py serve optimum|genai-fp32|genai-int4 OUT_DIR THREADS
        request  {"prompts": [[ids], ...], "new_tokens": N}
        answer   {"seconds": wall time of the generation, "tokens": [[ids], ...]}
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def export(peer: str, model_dir: str, out: str) -> None:
    if peer == "optimum":
        from optimum.onnxruntime import ORTModelForCausalLM

        ORTModelForCausalLM.from_pretrained(model_dir, export=True, use_cache=True).save_pretrained(out)
    else:
        precision = peer.removeprefix("genai-")
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", model_dir, "-o", out, "-p", precision,
                        "-e", "cpu", "-c", str(Path(out).with_name(Path(out).name + ".cache"))], check=True, stdout=subprocess.DEVNULL)


def export_encoder(model_dir: str, out: str) -> None:
    """optimum's recipe for a sentence encoder: the export, its O2 and O3 optimizations, and its dynamic int8
    with the quantizer preset for this CPU (avx512_vnni where it has that, else avx2)."""
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTOptimizer, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig, AutoQuantizationConfig

    root = Path(out)
    ORTModelForFeatureExtraction.from_pretrained(model_dir, export=True).save_pretrained(root / "fp32")
    for level, preset in (("o2", AutoOptimizationConfig.O2), ("o3", AutoOptimizationConfig.O3)):  # O3: O2 with GELU approximated
        ORTOptimizer.from_pretrained(root / "fp32").optimize(save_dir=root / level, optimization_config=preset())
    flags = Path("/proc/cpuinfo").read_text()
    preset = AutoQuantizationConfig.avx512_vnni if "avx512_vnni" in flags else AutoQuantizationConfig.avx2
    ORTQuantizer.from_pretrained(root / "fp32").quantize(save_dir=root / "int8", quantization_config=preset(is_static=False, per_channel=False))


def optimum_runner(out: str, threads: int):
    import numpy as np
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = ORTModelForCausalLM.from_pretrained(out, session_options=options)

    def run(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        ids = torch.tensor(np.asarray(prompts, dtype=np.int64))
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
        return got[:, ids.shape[1]:].tolist()

    return run


def genai_runner(out: str, threads: int):
    import numpy as np
    import onnxruntime_genai as og

    config_file = Path(out) / "genai_config.json"
    config = json.loads(config_file.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    config_file.write_text(json.dumps(config, indent=2))
    model = og.Model(out)

    def run(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        ids = np.asarray(prompts, dtype=np.int32)
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=ids.shape[1] + new_tokens, min_length=ids.shape[1] + new_tokens,
                                  batch_size=ids.shape[0])
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
        return [list(map(int, generator.get_sequence(i)))[ids.shape[1]:] for i in range(ids.shape[0])]

    return run


def serve(peer: str, out: str, threads: int) -> None:
    run = optimum_runner(out, threads) if peer == "optimum" else genai_runner(out, threads)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        tokens = run(request["prompts"], request["new_tokens"])
        print(json.dumps({"seconds": time.perf_counter() - start, "tokens": tokens}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "export":
        export(*sys.argv[2:5])
    elif sys.argv[1] == "export-encoder":
        export_encoder(*sys.argv[2:4])
    else:
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
