"""Models past protobuf's 2 GiB keep their weights in a file beside the graph. The threshold is
lowered here (TOOLKIT_EXTERNAL_DATA_BYTES) so that a tiny model takes the same path end to end:
export, optimize (fusion and onnxruntime's optimizer), quantize, check, load, package for Triton."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from toolkit.bundle import Bundle, sha256_file
from toolkit.errors import ToolkitError

# builds with every stage, half a minute: on one xdist worker (--dist loadgroup), not once on each
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("large-gpt")]


@pytest.fixture(scope="module")
def large_bundle(tmp_path_factory):
    from toolkit.compile.pipeline import build

    with pytest.MonkeyPatch.context() as env:
        env.setenv("TOOLKIT_EXTERNAL_DATA_BYTES", "4096")
        return build("gpt", tmp_path_factory.mktemp("large") / "gpt", preset="tiny", modes=["int8", "fp16", "int4"], select=False).path


def test_every_variant_keeps_its_weights_beside_its_graph_and_passes(large_bundle):
    bundle = Bundle.open(large_bundle)
    assert set(bundle.manifest.variants) == {"fp32", "opt", "int8", "fp16", "int4"}
    assert bundle.manifest.variants["int4"].recipe["parent"] == "opt"  # attention stays fused around the packed weights
    for name, variant in bundle.manifest.variants.items():
        assert [e["file"] for e in variant.external_data] == [f"{variant.file}.data"], name
        graph = onnx.load(str(large_bundle / variant.file), load_external_data=False)
        assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer if t.ByteSize() > 1024), name
        assert variant.bytes == sum((large_bundle / f).stat().st_size for f in (variant.file, f"{variant.file}.data"))
        assert variant.parity["passed"], (name, variant.parity)
    assert [p.name for p in large_bundle.iterdir() if p.name.startswith(".")] == [".toolkit.lock"]  # no staging left behind


def test_a_large_variant_runs_and_is_verified_with_its_weights(large_bundle, copy_of):
    import toolkit

    model = toolkit.load(large_bundle, variant="opt", provider="cpu")
    ids = np.random.default_rng(0).integers(0, 50, size=(2, 5))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(5), (2, 1))}
    feeds |= {i.name: np.zeros((2, *i.shape[1:2], 0, *i.shape[3:]), np.float32) for i in model.inputs if i.name.startswith("past_")}
    assert model.run(feeds)["logits"].shape[:2] == (2, 5)
    tampered = copy_of(large_bundle)
    with open(tampered / "model.opt.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x7f\x7f\x7f\x7f")
    with pytest.raises(ToolkitError, match=r"model\.opt\.onnx\.data \(variant 'opt'\) fails its sha256 check"):
        toolkit.load(tampered, variant="opt", provider="cpu")


def test_triton_gets_the_weights_beside_the_graph(large_bundle, tmp_path):
    from toolkit.serve.triton import package_triton

    package_triton(large_bundle, tmp_path / "repo", variant="int8")
    (version,) = [p for p in (tmp_path / "repo").iterdir() if p.is_dir()]
    assert sorted(p.name for p in (version / "1").iterdir()) == ["model.int8.onnx.data", "model.onnx"]
    import onnxruntime as ort

    ort.InferenceSession(str(version / "1" / "model.onnx"), providers=["CPUExecutionProvider"])  # finds its weights
    integrity = json.loads((version / "integrity.json").read_text())  # the manifest's record, checked on the copies
    variant = Bundle.open(large_bundle).manifest.variants["int8"]
    assert integrity["variant"] == "int8" and integrity["files"] == {
        "1/model.onnx": {"sha256": variant.sha256, "bytes": (version / "1/model.onnx").stat().st_size},
        "1/model.int8.onnx.data": {"sha256": variant.external_data[0]["sha256"], "bytes": variant.external_data[0]["bytes"]}}
    assert sha256_file(version / "1/model.int8.onnx.data") == variant.external_data[0]["sha256"]


def test_static_int8_calibrates_a_large_model(tmp_path, monkeypatch):
    """quantize_static runs the model it augments for calibration: with the weights beside it too."""
    from toolkit.compile.pipeline import build

    monkeypatch.setenv("TOOLKIT_EXTERNAL_DATA_BYTES", "4096")
    bundle = build("cnn", tmp_path / "cnn", preset="tiny", modes=["int8-static"], select=False)
    variant = bundle.manifest.variants["int8-static"]
    assert variant.external_data and variant.parity["passed"], variant.parity
