"""Stage export: zoo and user models to valid bundles; failures are explained and leave nothing behind."""

import json

import onnx
import pytest

from tests.conftest import ZOO
from toolkit.bundle import MANIFEST_NAME, Bundle, sha256_file
from toolkit.compile.exporter import export
from toolkit.errors import ToolkitError


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_exports_to_a_valid_bundle(exported, name):
    path = exported(name)
    bundle = Bundle.open(path)
    manifest = bundle.manifest
    variant = manifest.variants["fp32"]
    assert variant.recipe == {"stage": "export", "options": {"exporter": "dynamo", "opset": 18}, "parent": None}
    assert variant.sha256 == sha256_file(path / variant.file)
    proto = onnx.load(path / variant.file)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version <= 10  # what onnxruntime-gpu 1.31 accepts
    graph_inputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.input}
    assert graph_inputs == {t.name: list(t.shape) for t in manifest.inputs}
    assert "batch" in {d.name for d in manifest.dims}
    assert manifest.outputs[0].shape[0] == "batch"
    assert manifest.source.to_json() == {"kind": "zoo", "model": name, "preset": "tiny"}
    assert set(manifest.versions) >= {"torch", "onnx", "onnxruntime", "toolkit"}
    assert len(manifest.reference["weights_sha256"]) == 64


def test_sequence_models_name_their_output_dims(exported):
    manifest = Bundle.open(exported("gpt")).manifest
    assert manifest.outputs[0].shape == ("batch", "seq", 257)
    assert manifest.outputs[1].shape == ("batch", 2, "past+seq", 32)  # present_key_0 grows by the step's tokens
    assert [d.name for d in manifest.dims] == ["batch", "seq", "past"] and manifest.dims[1].max == 128
    assert manifest.parts == [] and "static" not in manifest.generation  # a CPU deployment does not pay for it


@pytest.mark.slow
def test_a_decoder_exports_its_static_cache_graph_on_request(exported):
    manifest = Bundle.open(exported("gpt", static_cache=True)).manifest
    assert manifest.parts == ["static"] and manifest.generation["static"] == "static"
    static = Bundle.open(exported("gpt", static_cache=True) / "static").manifest
    assert static.name == "gpt-static" and [t.name for t in static.inputs[:4]] == ["input_ids", "attention_mask", "position_ids", "cache_position"]
    assert static.inputs[1].shape == ("batch", 128) and static.inputs[4].shape == ("batch", 2, 128, 32)  # the whole context, preallocated


def test_user_factory_exports(exported):
    manifest = Bundle.open(exported("userpkg.toy:build")).manifest
    assert manifest.source.to_json() == {"kind": "factory", "ref": "userpkg.toy:build"}
    assert manifest.name == "toy"  # the module's name, safe in URLs and Triton directories (not "toy:build")
    assert [o.name for o in manifest.outputs] == ["scaled", "pooled"]
    assert manifest.outputs[0].shape == ("batch", "length", 4) and manifest.outputs[1].shape == ("batch", 4)


def test_torchscript_exporter_on_request(exported):
    manifest = Bundle.open(exported("lstm", exporter="torchscript")).manifest
    assert manifest.variants["fp32"].recipe["options"]["exporter"] == "torchscript"
    assert manifest.outputs[0].shape == ("batch", 1)


def test_auto_falls_back_to_torchscript_and_says_why(tmp_path, monkeypatch):
    from toolkit.compile import exporter as export_module

    def broken(*_args, **_kwargs):
        raise RuntimeError("No ONNX function found for <OpOverload(op='aten.fancy', overload='default')>")

    monkeypatch.setattr(export_module, "_export_dynamo", broken)
    said = []
    bundle = export("mlp", tmp_path / "b", preset="tiny", progress=said.append, isolate=False)
    options = bundle.manifest.variants["fp32"].recipe["options"]
    assert options["exporter"] == "torchscript"
    assert "aten::fancy has no ONNX translation" in options["fallback_reason"]
    assert any("trying the TorchScript exporter" in s for s in said)


@pytest.mark.slow
def test_unexportable_op_is_named_and_nothing_is_written(tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(ToolkitError) as info:
        export("userpkg.toy:unexportable", out)
    message = str(info.value)
    assert "dynamo exporter could not export" in message and "torchscript exporter could not export" in message
    assert "operator: userpkg::mystery has no ONNX translation" in message
    assert "Traceback" not in message and len(message.splitlines()) < 15
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_auto_falls_back_to_torchscript_when_dynamo_fixes_a_dynamic_dim(tmp_path):
    bundle = export("userpkg.toy:traced_constant", tmp_path / "b")
    options = bundle.manifest.variants["fp32"].recipe["options"]
    assert options["exporter"] == "torchscript"
    assert "input 'x' axis 1 was meant to be dynamic (seq) but was exported as the constant 6" in options["fallback_reason"]


@pytest.mark.slow
def test_dim_fixed_by_the_code_is_refused_by_the_dynamo_exporter(tmp_path):
    with pytest.raises(ToolkitError, match=r"input 'x' axis 1 was meant to be dynamic \(seq\) but was exported as the constant 6"):
        export("userpkg.toy:traced_constant", tmp_path / "b", exporter="dynamo")


def test_model_that_fails_at_its_own_check_sizes_is_explained(tmp_path):
    with pytest.raises(ToolkitError, match=r"the PyTorch model itself fails at sizes \{'batch': 3, 'seq': 9\}"):
        export("userpkg.toy:baked", tmp_path / "b", exporter="torchscript")


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("resnet", "unknown model 'resnet'; known: mlp, cnn, lstm, encoder, gpt, seq2seq. For your own model pass package.module:factory."),
        ("userpkg.nothere:build", "cannot import 'userpkg.nothere' for model 'userpkg.nothere:build'"),
        ("userpkg.toy:missing", "userpkg.toy has no callable 'missing'"),
        ("userpkg.toy:not_a_spec", "returned Mysterious; it must return a toolkit.ModelSpec"),
        (":build", "must look like package.module:factory"),
    ],
)
def test_bad_model_references(tmp_path, model, message):
    with pytest.raises(ToolkitError) as info:
        export(model, tmp_path / "b")
    assert message in str(info.value)


@pytest.mark.slow
def test_existing_bundle_needs_force_and_is_replaced_whole(tmp_path):
    out = tmp_path / "b"
    export("mlp", out, preset="tiny")
    (out / "stale.txt").write_text("left from before")
    with pytest.raises(ToolkitError, match="already exists; pass --force"):
        export("mlp", out, preset="tiny")
    export("mlp", out, preset="tiny", force=True)
    assert not (out / "stale.txt").exists() and (out / MANIFEST_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no staging or retired dirs left


@pytest.mark.slow
def test_interrupted_export_leaves_the_old_bundle_intact(tmp_path, monkeypatch):
    out = tmp_path / "b"
    export("mlp", out, preset="tiny")
    before = (out / MANIFEST_NAME).read_bytes()
    from toolkit.compile import exporter as export_module

    def interrupted(*_args, **_kwargs):  # after the model file is written, before the manifest
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "_variant", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export("mlp", out, preset="tiny", force=True)
    assert (out / MANIFEST_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_refuses_to_replace_a_directory_that_is_not_a_bundle(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ToolkitError, match="is not a bundle; refusing to replace it"):
        export("mlp", out, preset="tiny", force=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_bad_options(tmp_path):
    with pytest.raises(ToolkitError, match="unknown exporter 'onnx'"):
        export("mlp", tmp_path / "b", exporter="onnx")
    with pytest.raises(ToolkitError, match="--opset 99 is out of range"):
        export("mlp", tmp_path / "b", opset=99)
    with pytest.raises(ToolkitError, match="--preset applies to zoo models only"):
        export("userpkg.toy:build", tmp_path / "b", preset="tiny")


def test_manifest_is_plain_json_with_the_documented_fields(exported):
    data = json.loads((exported("encoder") / MANIFEST_NAME).read_text())
    assert set(data) >= {"format_version", "name", "source", "task", "opset", "inputs", "outputs", "dims", "variants", "versions", "reference"}
    assert data["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"], "kind": "ids", "high": 512}
    assert data["dims"]["seq"] == {"min": 1, "max": 64, "export": 8, "check": [5, 17]}
    assert set(data["variants"]["fp32"]) >= {"file", "sha256", "bytes", "recipe", "precision", "parity"}


@pytest.mark.slow
def test_exports_do_not_depend_on_what_ran_before_in_the_process(tmp_path):
    """torch 2.13 fixes the sequence length of a second LSTM export in one process; isolation avoids it."""
    for name in ("first", "second"):
        manifest = export("lstm", tmp_path / name, preset="tiny").manifest
        assert manifest.inputs[0].shape == ("batch", "seq", 16)


@pytest.mark.slow
def test_in_process_export_works_for_factories_defined_here(tmp_path, monkeypatch):
    import sys
    import types

    from userpkg import toy

    module = types.ModuleType("defined_here")
    module.build = toy.build
    monkeypatch.setitem(sys.modules, "defined_here", module)
    assert export("defined_here:build", tmp_path / "b", isolate=False).manifest.outputs[1].shape == ("batch", 4)
    with pytest.raises(ToolkitError, match="cannot import 'defined_here'"):
        export("defined_here:build", tmp_path / "c")


def test_a_spec_names_its_bundle_unless_the_caller_does(tmp_path):
    from toolkit.spec import ModelSpec, TensorSpec

    assert export("userpkg.toy:named", tmp_path / "a").manifest.name == "scaler"
    assert export("userpkg.toy:named", tmp_path / "b", name="scaler-v2").manifest.name == "scaler-v2"
    with pytest.raises(ValueError, match=r"name 'my:model'.*letters, digits"):
        ModelSpec(module=None, inputs=[TensorSpec("x", "float32", (2,))], outputs=["y"], name="my:model")
