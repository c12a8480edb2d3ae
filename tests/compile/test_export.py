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


@pytest.mark.slow  # exports or quantizes a model
def test_a_spec_names_its_bundle_unless_the_caller_does(tmp_path):
    from toolkit.spec import ModelSpec, TensorSpec

    assert export("userpkg.toy:named", tmp_path / "a").manifest.name == "scaler"
    assert export("userpkg.toy:named", tmp_path / "b", name="scaler-v2").manifest.name == "scaler-v2"
    with pytest.raises(ValueError, match=r"name 'my:model'.*letters, digits"):
        ModelSpec(module=None, inputs=[TensorSpec("x", "float32", (2,))], outputs=["y"], name="my:model")


_HELPER = '''import torch


def quantize_scale(x):
    steps = round(x.abs().max().item() * 4)
    return torch.round(x * steps) / steps
'''


@pytest.mark.slow  # exports or quantizes a model
def test_a_builtin_the_exporter_cannot_translate_is_named_with_its_line_in_an_installed_package(tmp_path, monkeypatch):
    helpers = tmp_path / "site-packages" / "userhelpers"
    helpers.mkdir(parents=True)
    (helpers / "__init__.py").write_text(_HELPER)
    monkeypatch.syspath_prepend(str(helpers.parent))
    with pytest.raises(ToolkitError) as failure:
        export("userpkg.failing:rounding", tmp_path / "b", exporter="dynamo")
    message = str(failure.value)
    assert "\x1b[" not in message and "This is step" not in message  # torch's boilerplate and colours are gone
    assert "cause: DispatchError: No ONNX function found for <built-in function round>" in message
    assert f"at: {helpers / '__init__.py'}:5 in quantize_scale: steps = round(x.abs().max().item() * 4)" in message
    assert "torch.round on the tensor" in message and "try: --exporter torchscript" in message
    assert not (tmp_path / "b").exists()


@pytest.mark.slow  # exports or quantizes a model
def test_a_branch_on_tensor_values_is_named_with_its_line():
    import inspect

    from userpkg import failing

    line = inspect.getsourcelines(failing.Branching.forward)[1] + 1
    with pytest.raises(ToolkitError) as failure:
        export("userpkg.failing:branching", "/nonexistent/never-written", exporter="dynamo")
    message = str(failure.value)
    assert "cause: DataDependentOutputException: aten.equal.default" in message
    assert f"at: {failing.__file__}:{line} in forward: if torch.equal(x[:, :1], x[:, 1:2]):" in message
    assert "pick with torch.where" in message


@pytest.mark.slow  # exports or quantizes a model
def test_a_torchscript_module_goes_to_the_torchscript_exporter_and_says_why(tmp_path):
    with pytest.raises(ToolkitError, match=r"is a TorchScript module \(torch.jit.ScriptModule\).*--exporter torchscript"):
        export("userpkg.failing:scripted", tmp_path / "a", exporter="dynamo")
    said = []
    options = export("userpkg.failing:scripted", tmp_path / "b", progress=said.append).manifest.variants["fp32"].recipe["options"]
    assert options["exporter"] == "torchscript" and "TorchScript module" in options["fallback_reason"]
    assert not any("dynamo exporter failed" in m for m in said)  # not tried, so not reported as failed
    from toolkit.compile.parity import check

    assert check(tmp_path / "b", trust_source=True)["fp32"]["passed"]


@pytest.mark.parametrize(("factory", "message"), [
    ("too_many", r"the spec has 3 inputs \(x, scale, bias\) but Linear.forward\(x, scale\) takes 2: remove bias from the spec"),
    ("too_few", r"Pair.forward\(values, weights\) needs 2 inputs but the spec has 1 \(values\): add weights to the spec"),
    ("reordered", r"inputs \(weights, values\) are in another order than Pair.forward\(values, weights\)'s parameters"),
])
def test_a_spec_that_does_not_fit_forward_is_refused_before_any_exporter(tmp_path, factory, message):
    said = []
    with pytest.raises(ToolkitError, match=message):
        export(f"userpkg.failing:{factory}", tmp_path / "b", progress=said.append)
    assert not any("exporting with" in m for m in said)


def test_output_shapes_are_what_the_model_returns_whatever_the_exporter_recorded(exported):
    """The TorchScript exporter can record the export's batch as a fixed size, or name a fixed axis
    after an internal node: both are set to what the model returns at the check sizes."""
    from toolkit.compile.exporter import _named_outputs
    from toolkit.reference.source import resolve

    bundle = Bundle.open(exported("userpkg.toy:build"))
    proto = onnx.load(str(bundle.variant_path("fp32")))
    scaled, pooled = proto.graph.output
    scaled.type.tensor_type.shape.dim[0].dim_value = 2  # the export's batch, baked
    pooled.type.tensor_type.shape.dim[1].dim_param = "Concatnew_state_dim_0"  # fixed at 4, named
    spec = resolve(bundle.manifest.source)
    assert [o.shape for o in _named_outputs(proto, spec)] == [("batch", "length", 4), ("batch", 4)]
    pooled.type.tensor_type.shape.dim[1].dim_value = 5
    with pytest.raises(ToolkitError, match=r"output 'pooled' axis 1 was exported as 5, but the model returns 4 there"):
        _named_outputs(proto, spec)
