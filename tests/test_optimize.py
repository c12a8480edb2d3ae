"""Stage optimize: transformer fusions (onnxscript for dynamo exports, onnxruntime for hinted TorchScript ones), generic optimizations elsewhere, parity kept."""

import onnx
import pytest

from toolkit.bundle import Bundle
from toolkit.check import check
from toolkit.optimize import optimize


@pytest.mark.parametrize(("name", "fused"), [
    ("encoder", {"MultiHeadAttention", "SkipLayerNormalization", "BiasGelu"}),
    ("gpt", {"MultiHeadAttention", "SkipLayerNormalization", "FastGelu"}),
    ("seq2seq", {"MultiHeadAttention", "SkipLayerNormalization"}),
])
def test_transformers_are_fused_and_keep_parity(exported, copy_of, name, fused):
    path = copy_of(exported(name))
    optimize(path)
    variant = Bundle.open(path).manifest.variants["opt"]
    assert variant.recipe["parent"] == "fp32" and variant.precision == "fp32"
    options = variant.recipe["options"]
    assert options["fusion"]["engine"] == "onnxscript"  # the zoo exports with dynamo
    assert fused <= set(options["fusion"]["fused"])
    assert options["nodes"]["after"] < options["nodes"]["before"]
    for part in Bundle.open(path).parts():  # seq2seq's encoder is optimized with its decoder
        assert "MultiHeadAttention" in part.manifest.variants["opt"].recipe["options"]["fusion"]["fused"]
    record = check(path, variants=["opt"])["opt"]
    assert record["passed"] and record.get("parts", {}) == ({"encoder": {"passed": True}} if name == "seq2seq" else {})


def test_gpt_keeps_tanh_gelu(exported, copy_of):
    """GPT-2 uses the tanh GELU: the fusion must produce FastGelu (tanh), never erf-based Gelu/BiasGelu."""
    path = copy_of(exported("gpt"))
    optimize(path)
    ops = {n.op_type for n in onnx.load(path / "model.opt.onnx").graph.node}
    assert "FastGelu" in ops and not ops & {"Gelu", "BiasGelu", "Erf"}


def test_gpt_attention_reads_the_kv_cache_in_place(exported, copy_of):
    """Each fused attention takes its layer's past keys/values and returns the present ones itself:
    no Concat/Transpose of the cache is left in the decoding graph."""
    path = copy_of(exported("gpt"))
    optimize(path)
    graph = onnx.load(path / "model.opt.onnx").graph
    attention = [n for n in graph.node if n.op_type == "MultiHeadAttention"]
    past = sorted(i.name for i in graph.input if i.name.startswith("past_"))
    assert sorted(name for n in attention for name in n.input[6:8]) == past
    assert sorted(name for n in attention for name in n.output[1:3]) == sorted(o.name for o in graph.output[1:])
    assert not {n.op_type for n in graph.node} & {"Concat", "Transpose", "Softmax"}


def test_models_without_hints_get_generic_optimizations(exported, copy_of):
    path = copy_of(exported("cnn"))
    said = []
    optimize(path, progress=said.append)
    assert Bundle.open(path).manifest.variants["opt"].recipe["options"]["fusion"] is None
    assert any("generic graph optimizations only" in s for s in said)
    assert check(path, variants=["opt"])["opt"]["passed"]


def test_cli_optimize_checks_the_new_variant(cli, exported, copy_of):
    path = copy_of(exported("encoder"))
    result = cli("optimize", path)
    assert result.exit_code == 0, result.output
    assert "variant opt" in result.stdout and "pass" in result.stdout
    assert Bundle.open(path).manifest.variants["opt"].parity["passed"]


def test_fusion_does_not_break_the_reference_models_package(exported, copy_of):
    """onnxruntime.transformers puts its own `models` folder on sys.path; the zoo must still resolve."""
    import onnxruntime.transformers.optimizer  # noqa: F401

    from toolkit.source import reference_models

    assert hasattr(reference_models(), "build")
    assert check(copy_of(exported("gpt")))["fp32"]["passed"]
