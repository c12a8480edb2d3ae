"""Runtime API: load, run, metadata, providers, input validation, integrity, threads, no torch."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import toolkit
from tests.conftest import ZOO
from toolkit.bundle import Bundle
from toolkit.runtime.samples import make_feeds
from toolkit.runtime.session import cuda_status

CUDA_OK, CUDA_WHY = cuda_status()


def feeds_for(model, seed=0, index=1):
    return make_feeds(model.inputs, {d.name: d.check[index] for d in model.bundle.manifest.dims}, seed)


@pytest.mark.parametrize("name", ZOO)
def test_load_and_run_every_zoo_model(exported, name):
    model = toolkit.load(exported(name), provider="cpu")
    assert model.provider == "cpu" and model.variant == "fp32"
    result = model.run(feeds_for(model))
    assert list(result) == [o.name for o in model.outputs]
    assert all(np.isfinite(v).all() for v in result.values())


@pytest.mark.parametrize(
    "provider",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_OK, reason=f"no CUDA provider: {CUDA_WHY}"))],
)
def test_provider_in_use_is_read_from_the_session(exported, provider):
    model = toolkit.load(exported("encoder"), provider=provider)
    assert model.provider == provider
    assert model._session.get_providers()[0] == {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[provider]


def test_auto_reports_what_it_picked(exported):
    model = toolkit.load(exported("mlp"))
    assert model.provider == ("cuda" if CUDA_OK else "cpu")
    if not CUDA_OK:
        assert model.provider_note == f"CUDA not used: {CUDA_WHY}"


@pytest.mark.skipif(CUDA_OK, reason="this machine has a working CUDA provider")
def test_asking_for_cuda_without_it_is_a_clear_error(exported):
    with pytest.raises(toolkit.ToolkitError, match=r"provider 'cuda' is not available: .+\. Use provider 'cpu'"):
        toolkit.load(exported("mlp"), provider="cuda")


def test_unknown_provider_and_variant(exported):
    with pytest.raises(toolkit.ToolkitError, match="unknown provider 'tpu'; choose auto, cpu, cuda"):
        toolkit.load(exported("mlp"), provider="tpu")
    with pytest.raises(toolkit.ToolkitError, match="has no variant 'int4'; its variants: fp32"):
        toolkit.load(exported("mlp"), variant="int4")
    with pytest.raises(toolkit.ToolkitError, match="threads 0: give at least 1"):
        toolkit.load(exported("mlp"), threads=0)


def test_call_single_input_returns_the_array(exported):
    model = toolkit.load(exported("mlp"), provider="cpu")
    x = np.zeros((2, 784), np.float32)
    np.testing.assert_array_equal(model(x), model.run({"x": x})["logits"])
    assert [(t.name, t.dtype, t.shape) for t in model.inputs] == [("x", "float32", ("batch", 784))]
    assert [(t.name, t.shape) for t in model.outputs] == [("logits", ("batch", 10))]


def test_call_by_name_for_multi_input_and_dict_for_multi_output(exported):
    model = toolkit.load(exported("userpkg.toy:build"), provider="cpu")
    feeds = feeds_for(model)
    result = model(**feeds)
    assert set(result) == {"scaled", "pooled"}
    with pytest.raises(toolkit.ToolkitError, match=r"takes inputs values \(float32 \[batch, length, 6\]\), weights .*pass them by name"):
        model(feeds["values"])
    assert list(model.run(feeds, outputs=["pooled"])) == ["pooled"]
    with pytest.raises(toolkit.ToolkitError, match="unknown output 'nope'; toy has outputs scaled, pooled"):
        model.run(feeds, outputs=["nope"])


def test_plain_python_lists_take_the_input_dtype(exported):
    model = toolkit.load(exported("encoder"), provider="cpu")
    logits = model(input_ids=[[1, 2, 3]], attention_mask=[[1, 1, 1]])
    assert logits.shape == (1, 2)


def _encoder_feeds():
    return {"input_ids": np.ones((2, 7), np.int64), "attention_mask": np.ones((2, 7), np.int64)}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.update(token_type_ids=f["input_ids"]), "unknown input 'token_type_ids'; encoder takes input_ids (int64 [batch, seq]), attention_mask (int64 [batch, seq])."),
        (lambda f: f.pop("attention_mask"), "missing input 'attention_mask' (int64 [batch, seq]); encoder takes input_ids (int64 [batch, seq]), attention_mask (int64 [batch, seq])."),
        (lambda f: f.update(input_ids=f["input_ids"].astype(np.int32)), "input 'input_ids': expected dtype int64, got int32 (convert with .astype(np.int64))."),
        (lambda f: f.update(input_ids=f["input_ids"][0]), "input 'input_ids': expected rank 2 with shape [batch, seq], got rank 1 with shape (7,)."),
        (lambda f: f.update(attention_mask=np.ones((2, 8), np.int64)), "input 'attention_mask': axis 1 (seq) is 8, but input 'input_ids' has seq = 7."),
        (lambda f: f.update(input_ids=np.ones((2, 65), np.int64), attention_mask=np.ones((2, 65), np.int64)), "input 'input_ids': axis 1 (seq) is 65; seq must be [1, 64]."),
        (lambda f: f["input_ids"].__setitem__((0, 0), 512), "input 'input_ids': token ids must lie in [0, 512), got values in [1, 512]."),
        (lambda f: f["input_ids"].__setitem__((0, 0), -1), "input 'input_ids': token ids must lie in [0, 512), got values in [-1, 1]."),
    ],
)
def test_bad_inputs_are_named_before_onnxruntime_sees_them(exported, change, message):
    model = toolkit.load(exported("encoder"), provider="cpu")
    feeds = _encoder_feeds()
    change(feeds)
    with pytest.raises(toolkit.ToolkitError) as info:
        model.run(feeds)
    assert str(info.value) == message


def test_fixed_dim_mismatch_and_non_mapping(exported):
    model = toolkit.load(exported("cnn"), provider="cpu")
    with pytest.raises(toolkit.ToolkitError, match=r"input 'image': axis 2 must be 28, got 27 \(expected shape \[batch, 1, 28, 28\], got \(1, 1, 27, 28\)\)\."):
        model(np.zeros((1, 1, 27, 28), np.float32))
    with pytest.raises(toolkit.ToolkitError, match="inputs must be a mapping of input name to array, got list"):
        model.run([np.zeros((1, 1, 28, 28), np.float32)])


def test_concurrent_calls_from_threads_match_serial_results(exported):
    model = toolkit.load(exported("gpt"), provider="cpu")
    batches = [feeds_for(model, seed=s, index=s % 2) for s in range(16)]
    serial = [model.run(f)["logits"] for f in batches]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(lambda f: model.run(f)["logits"], batches * 2))
    for i, got in enumerate(threaded):
        np.testing.assert_array_equal(got, serial[i % len(serial)])


def test_a_modified_model_file_is_refused(exported, copy_of):
    path = copy_of(exported("mlp"))
    model_file = path / Bundle.open(path).manifest.variants["fp32"].file
    data = bytearray(model_file.read_bytes())
    data[-10] ^= 0xFF
    model_file.write_bytes(bytes(data))
    with pytest.raises(toolkit.ToolkitError, match=r"model.fp32.onnx \(variant 'fp32'\) fails its sha256 check .* modified or corrupted"):
        toolkit.load(path)


def test_missing_bundle_and_bad_manifest(tmp_path):
    with pytest.raises(toolkit.ToolkitError, match=f"{tmp_path / 'nope'} is not a bundle: it does not exist"):
        toolkit.load(tmp_path / "nope")
    (tmp_path / "manifest.json").write_text('{"format_version": 1}')
    with pytest.raises(toolkit.ToolkitError, match="is not a valid manifest"):
        toolkit.load(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format_version": 7}')
    with pytest.raises(toolkit.ToolkitError, match="has bundle format version 7; this toolkit reads version 1"):
        toolkit.load(tmp_path)


def test_the_runtime_never_imports_torch(exported):
    code = (
        "import sys, numpy as np, toolkit\n"
        f"m = toolkit.load({str(exported('encoder'))!r})\n"
        "m(input_ids=np.ones((1, 4), np.int64), attention_mask=np.ones((1, 4), np.int64))\n"
        "import toolkit.runtime.describe, toolkit.runtime.samples, toolkit.serve.protocol, toolkit.bundle\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'models', 'onnxscript', 'sklearn'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cuda_sessions_compute_fp32_in_fp32_not_tf32():
    # onnxruntime's CUDA default (TF32 MatMul) put fp32 logits 1.5e-4..6e-4 off on an H100: past the fp32 gate.
    from toolkit.runtime.session import session_providers

    assert session_providers("cuda") == [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    assert session_providers("cpu") == ["CPUExecutionProvider"]


def test_cpu_sessions_keep_add_and_layer_norm_apart(exported, tmp_path):
    """onnxruntime would fuse the encoder's residual Add + LayerNormalization into SkipLayerNormalization
    when a session loads it; its CPU kernel for that is the slower one, so CPU sessions must not."""
    import onnx
    import onnxruntime as ort

    from toolkit.runtime.session import new_session

    model_file = str(Bundle.open(exported("encoder")).variant_path("fp32"))
    loaded = {}
    for provider in ("cpu", None):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{provider}.onnx")
        if provider:
            new_session(model_file, provider, options)
        else:  # onnxruntime's own default, for contrast
            ort.InferenceSession(model_file, options, providers=["CPUExecutionProvider"])
        loaded[provider] = {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
    assert "SkipLayerNormalization" in loaded[None]
    assert "SkipLayerNormalization" not in loaded["cpu"] and "LayerNormalization" in loaded["cpu"]


def test_why_a_variant_failed_names_the_part_that_failed():
    """An encoder-decoder's variant fails when its encoder part does, though its own gates pass."""
    from toolkit.runtime.describe import missed_gates

    record = {"passed": False, "errors": [], "outputs": {"logits": {"passed": True, "max_abs_err": 0.1, "scale": 1.0}},
              "task_metric": {"metric": "next_token_agreement", "value": 0.97, "threshold": None, "passed": True},
              "parts": {"encoder": {"passed": False}}}
    assert missed_gates(record) == "its part encoder fails its gates (`toolkit inspect DIR/encoder`)"
