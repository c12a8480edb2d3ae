"""Stage optimize: transformer fusions (onnxscript for dynamo exports, onnxruntime for hinted TorchScript ones), generic optimizations elsewhere, parity kept."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolkit.bundle import Bundle
from toolkit.compile.optimizer import optimize
from toolkit.compile.parity import check
from toolkit.compile.passes.skip_layer_norm import split_skip_layer_norm
from toolkit.runtime.session import new_session


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
    # made for the CPU (the default): the fused SkipLayerNormalization is split again
    assert options["provider"] == "cpu" and options["passes"]["SkipLayerNormalization split"] > 0
    ops = {n.op_type for n in onnx.load(path / "model.opt.onnx").graph.node}
    assert "LayerNormalization" in ops and "SkipLayerNormalization" not in ops
    for part in Bundle.open(path).parts():  # seq2seq's encoder is optimized with its decoder
        assert "MultiHeadAttention" in part.manifest.variants["opt"].recipe["options"]["fusion"]["fused"]
    record = check(path, variants=["opt"])["opt"]
    assert record["passed"] and record.get("parts", {}) == ({"encoder": {"passed": True}} if name == "seq2seq" else {})


@pytest.mark.slow  # a CUDA-made graph, checked on the CPU: the full suite's
def test_cuda_variant_keeps_skip_layer_norm(exported, copy_of):
    """Made for CUDA (no GPU needed to make it), the graph keeps the fused kernel, which is the faster there."""
    path = copy_of(exported("gpt"))
    optimize(path, provider="cuda")
    options = Bundle.open(path).manifest.variants["opt"].recipe["options"]
    assert options["provider"] == "cuda" and "SkipLayerNormalization split" not in options["passes"]
    assert "SkipLayerNormalization" in {n.op_type for n in onnx.load(path / "model.opt.onnx").graph.node}
    assert check(path, variants=["opt"])["opt"]["passed"]


def test_unknown_provider_is_refused(exported, copy_of):
    with pytest.raises(Exception, match="unknown provider 'tpu' to optimize for; choose cpu, cuda"):
        optimize(copy_of(exported("gpt")), provider="tpu")


def _skip_layer_norm_model(inputs: list[str], outputs: list[str], width: int = 16) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("SkipLayerNormalization", inputs, outputs, domain="com.microsoft", epsilon=1e-5)]
    read = [name for name in outputs[1:] if name]
    nodes += [helper.make_node("Relu", [name], [f"{name}_relu"]) for name in read]
    shape = [2, 3, width]
    graph = helper.make_graph(
        nodes, "sln", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "skip")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in [outputs[0], *(f"{r}_relu" for r in read)]],
        [numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), n) for n in ("gamma", "beta", "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("beta", ["beta", ""])
@pytest.mark.parametrize("bias", ["bias", ""])
@pytest.mark.parametrize("sum_read", [True, False])
def test_split_skip_layer_norm_computes_the_same(beta, bias, sum_read):
    inputs = ["x", "skip", "gamma", beta, bias]
    while not inputs[-1]:
        inputs.pop()
    model = _skip_layer_norm_model(inputs, ["y", "", "", "sum"] if sum_read else ["y"])
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((2, 3, 16)).astype(np.float32) for n in ("x", "skip")}
    expected = new_session(model.SerializeToString(), "cpu").run(None, feeds)
    assert split_skip_layer_norm(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops[: 3 if bias else 2] == ["Add", *(["Add"] if bias else []), "LayerNormalization"]
    got = new_session(model.SerializeToString(), "cpu").run(None, feeds)
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)


def test_split_keeps_a_skip_layer_norm_whose_statistics_are_read():
    model = _skip_layer_norm_model(["x", "skip", "gamma", "beta"], ["y", "mean"])
    assert split_skip_layer_norm(model) == 0
    assert model.graph.node[0].op_type == "SkipLayerNormalization"


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


def test_lstm_loses_the_exporters_shape_glue(exported, copy_of):
    """Zero initial states and the Transpose + computed Reshape between layers go: the LSTMs are left
    with one Squeeze between them, which int8 (quantized from opt) inherits."""
    path = copy_of(exported("lstm"))  # tiny: 2 layers
    optimize(path)
    options = Bundle.open(path).manifest.variants["opt"].recipe["options"]
    assert options["passes"] == {"zero initial states dropped": 4, "Reshape to Squeeze": 2, "SkipLayerNormalization split": 0,
                                  "sibling MatMuls packed": 0, "rotary embeddings fused": 0, "attention over a cache fused": 0}
    ops = [n.op_type for n in onnx.load(path / "model.opt.onnx").graph.node]
    assert ops[:4] == ["Transpose", "LSTM", "Squeeze", "LSTM"] and not {"Shape", "Expand", "Reshape"} & set(ops)
    assert check(path, variants=["opt"])["opt"]["passed"]


@pytest.mark.parametrize(("args", "provider"), [((), "cpu"), (("--provider", "cuda"), "cuda"), (("--provider", "auto"), "auto")])
def test_cli_optimize_checks_the_new_variant(cli, exported, copy_of, args, provider):
    if provider == "auto":
        from toolkit.bench.compare import available_providers

        provider = "cuda" if "cuda" in available_providers() else "cpu"
    path = copy_of(exported("encoder"))
    result = cli("optimize", path, *args)
    assert result.exit_code == 0, result.output
    assert "variant opt" in result.stdout and "pass" in result.stdout
    variant = Bundle.open(path).manifest.variants["opt"]
    assert variant.parity["passed"] and variant.recipe["options"]["provider"] == provider


def test_fusion_does_not_break_the_reference_models_package(exported, copy_of):
    """onnxruntime.transformers puts its own `models` folder on sys.path; the zoo must still resolve."""
    import onnxruntime.transformers.optimizer  # noqa: F401

    from toolkit.reference.source import reference_models

    assert hasattr(reference_models(), "build")
    assert check(copy_of(exported("gpt")))["fp32"]["passed"]


@pytest.mark.slow
def test_the_static_cache_part_is_fused_and_checked_with_its_decoder(exported, copy_of):
    path = copy_of(exported("gpt", static_cache=True))
    optimize(path)
    static = Bundle.open(path / "static").manifest.variants["opt"].recipe["options"]["fusion"]
    assert static["engine"] == "onnxscript" and "MultiHeadAttention" in static["fused"]  # attention over the whole cache
    record = check(path, variants=["opt"])["opt"]
    assert record["passed"] and record["parts"] == {"static": {"passed": True}}
