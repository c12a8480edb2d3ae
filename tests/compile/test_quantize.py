"""Stage quantize: int8 dynamic, int8-static and fp16 variants, with their op reports and task gates."""

import re

import numpy as np
import onnx
import pytest

from tests.conftest import ZOO
from toolkit.bundle import Bundle
from toolkit.compile.parity import check
from toolkit.compile.quantization import FP16_KEEP_FP32, quantize
from toolkit.errors import ToolkitError


@pytest.fixture(scope="module")
def quantized(with_variants):
    """quantized(model) → a bundle of the tiny model with every quantized variant, and its check."""
    cache = {}

    def get(name):
        if name not in cache:
            path = with_variants(name, ("int8", "int8-static", "fp16"))
            cache[name] = (path, check(path))
        return cache[name]

    return get


@pytest.mark.parametrize("name", [n if n == "mlp" else pytest.param(n, marks=pytest.mark.slow) for n in ZOO])
def test_every_weight_of_the_dynamic_ops_is_quantized(quantized, name):
    path, _ = quantized(name)
    variant = Bundle.open(path).manifest.variants["int8"]
    assert variant.precision == "int8" and variant.recipe["parent"] == "fp32"
    ops = variant.recipe["options"]["ops"]
    for op, report in ops.items():
        expected_float = report["with_weights"] if op == "Conv" else 0  # convolutions: int8-static only
        assert report["float"] == expected_float, (op, report)


@pytest.mark.slow
def test_tied_gpt_head_is_quantized_once_not_dequantized_per_call(quantized):
    path, _ = quantized("gpt")
    ops = Bundle.open(path).manifest.variants["int8"].recipe["options"]["ops"]
    assert ops["MatMul"] == {"with_weights": 9, "quantized": 9, "float": 0}  # 2 layers × 4 + the tied head
    graph = onnx.load(path / "model.int8.onnx").graph
    constants = {t.name for t in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type == "Transpose" and n.input[0] in constants]


@pytest.mark.slow  # the LSTM's int8 quantization; the fast tier quantizes the mlp and the encoder
def test_lstm_weights_are_quantized(quantized):
    path, _ = quantized("lstm")
    ops = Bundle.open(path).manifest.variants["int8"].recipe["options"]["ops"]
    assert ops["LSTM"] == {"with_weights": 2, "quantized": 2, "float": 0}
    assert {n.op_type for n in onnx.load(path / "model.int8.onnx").graph.node} >= {"DynamicQuantizeLSTM"}


def test_static_quantization_takes_convolutions_and_the_calibration_set(quantized):
    path, records = quantized("cnn")
    options = Bundle.open(path).manifest.variants["int8-static"].recipe["options"]
    assert options["ops"]["Conv"] == {"with_weights": 3, "quantized": 3, "float": 0}
    assert options["calibration"] == {"method": "minmax", "samples": 32, "data": "the model's calibration set"}
    assert records["int8-static"]["accuracy"]["passed"]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_digit_classifiers_keep_accuracy_within_a_point(quantized, name):
    _, records = quantized(name)
    for mode in ("int8", "int8-static", "fp16"):
        accuracy = records[mode]["accuracy"]
        assert accuracy["drop"] <= 0.01 and records[mode]["passed"], (mode, accuracy)


def test_encoder_int8_agrees_with_the_reference(quantized):
    _, records = quantized("encoder")
    metric = records["int8"]["task_metric"]
    assert metric["metric"] == "top1_agreement" and metric["value"] >= 0.99 and records["int8"]["passed"]


@pytest.mark.slow
def test_a_variant_that_misses_its_gate_stays_marked_failed(exported, copy_of):
    path = copy_of(exported("userpkg.toy:outliers"))  # fails any per-tensor int8 by construction
    quantize(path, mode="int8-static", calibration_samples=32, trust_source=True)
    record = check(path, variants=["int8-static"], trust_source=True)["int8-static"]
    metric = record["task_metric"]
    assert metric["value"] < 0.99 and not metric["passed"] and not record["passed"]
    assert not Bundle.open(path).manifest.variants["int8-static"].parity["passed"]
    assert (path / "model.int8-static.onnx").is_file()


@pytest.mark.slow
def test_gpt_next_token_agreement_is_reported(quantized):
    _, records = quantized("gpt")
    metric = records["int8"]["task_metric"]
    assert metric["metric"] == "next_token_agreement" and metric["threshold"] is None and 0 < metric["value"] <= 1


# the fast tier keeps the small models (its 2-minute budget); the rest run in the full suite
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("gpt", "seq2seq", "encoder", "lstm") else n for n in ZOO])
def test_fp16_keeps_fp32_io_and_overflow_prone_ops(quantized, name):
    path, records = quantized(name)
    assert records["fp16"]["passed"], records["fp16"]
    model = onnx.load(path / "model.fp16.onnx")
    assert all(v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16 for v in [*model.graph.input, *model.graph.output])
    fp16_initializers = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert not set(node.input) & fp16_initializers, node.name
    if name in ("encoder", "gpt"):
        assert fp16_initializers  # the matmuls did go to fp16


def test_fp16_can_keep_residual_adds_in_fp32(exported, copy_of):
    # Every residual sum feeds an Add and a LayerNorm, both kept: the converter casts it once per consumer.
    path = copy_of(exported("gpt"))
    quantize(path, mode="fp16", keep_fp32=(*FP16_KEEP_FP32, "Add"))
    names = [n.name for n in onnx.load(path / "model.fp16.onnx").graph.node]
    assert len(names) == len(set(names))
    assert check(path, variants=["fp16"])["fp16"]["passed"]


@pytest.mark.slow
def test_no_temporary_files_land_anywhere(exported, copy_of, tmp_path, monkeypatch):
    path = copy_of(exported("gpt"))  # the decoder takes the pre-processing fallback path too
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    quantize(path, mode="int8")
    assert list(work.iterdir()) == []
    assert sorted(p.name for p in path.iterdir()) == [".toolkit.lock", "manifest.json", "model.fp32.onnx", "model.int8.onnx"]


def test_quantized_variants_run_through_the_runtime(quantized):
    import toolkit

    path, _ = quantized("encoder")
    ids = np.array([[1, 2, 3, 4]], np.int64)
    reference = toolkit.load(path, provider="cpu")(input_ids=ids, attention_mask=np.ones_like(ids))
    for variant in ("int8", "fp16"):
        logits = toolkit.load(path, variant=variant, provider="cpu")(input_ids=ids, attention_mask=np.ones_like(ids))
        assert logits.dtype == np.float32 and np.abs(logits - reference).max() < 0.1 * np.abs(reference).max() + 1e-3


def test_bad_quantize_requests(exported, copy_of, cli):
    path = copy_of(exported("mlp"))
    with pytest.raises(ToolkitError, match="unknown quantization mode 'int2'; choose one of int8, int8-static, fp16, int4"):
        quantize(path, mode="int2")
    with pytest.raises(ToolkitError, match="--calibration-samples must be at least 1, got 0"):
        quantize(path, mode="int8-static", calibration_samples=0)
    with pytest.raises(ToolkitError, match="unknown calibration method 'median'"):
        quantize(path, mode="int8-static", method="median")
    with pytest.raises(ToolkitError, match="unknown rounding 'floor'; choose one of gptq, nearest"):
        quantize(path, mode="int8-static", rounding="floor")
    with pytest.raises(ToolkitError, match="activation_bits must be 8 or 16, got 4"):
        quantize(path, mode="int8-static", activation_bits=4)
    quantize(path, mode="fp16")
    with pytest.raises(ToolkitError, match="variant 'fp16' is fp16; quantize from an fp32 variant"):
        quantize(path, mode="int8", source="fp16")
    result = cli("quantize", path, "--mode", "int2")
    assert result.exit_code == 2 and "'int2' is not one of" in result.output


@pytest.mark.slow
def test_cli_quantize_exits_1_when_the_gate_fails(cli, exported, copy_of):
    path = copy_of(exported("userpkg.toy:outliers"))
    result = cli("quantize", path, "--mode", "int8-static", "--calibration-samples", "32", "--trust-source")
    assert result.exit_code == 1
    assert "top1_agreement" in result.stdout and "FAIL" in result.stdout
    assert "to try: --method entropy or percentile" in result.stderr  # the next step, not just the verdict
    assert re.search(r"parity: FAILED on onnxruntime .*: top1_agreement [0-9.]+ against a threshold of 0.99", cli("inspect", path).stdout)
    failed = cli("quantize", path, "--mode", "int8", "--trust-source")
    assert failed.exit_code == 1 and "to try: --keep-float N" in failed.stderr
    kept = cli("quantize", path, "--mode", "int8", "--keep-float", "1", "--trust-source")  # its one MatMul in fp32: exact
    assert kept.exit_code == 0, kept.output


def test_options_that_do_not_apply_to_the_mode_are_refused(cli, exported):
    result = cli("quantize", exported("mlp"), "--mode", "fp16", "--calibration-samples", "8")
    assert result.exit_code == 2 and "--calibration-samples does not apply to --mode fp16; it takes --io, --keep-fp32" in result.output
    with pytest.raises(ToolkitError, match="--keep-fp32 does not apply to --mode int8-static"):
        quantize(exported("mlp"), mode="int8-static", keep_fp32=("Softmax",))
    assert "--smooth does not apply to --mode fp16" in cli("quantize", exported("mlp"), "--mode", "fp16", "--no-smooth").output


def test_cli_no_smooth_quantizes_without_smoothing(cli, exported, copy_of):
    path = copy_of(exported("userpkg.toy:outlier_channels"))
    result = cli("quantize", path, "--mode", "int8", "--no-smooth", "--no-check", "--trust-source")
    options = Bundle.open(path).manifest.variants["int8"].recipe["options"]
    assert result.exit_code == 0 and options["smooth"] is False and "smoothed" not in options, result.output


def test_fp16_with_fp16_inputs_and_outputs_records_their_dtypes_and_keeps_parity(exported, copy_of):
    from toolkit import Generator
    from toolkit.compile.quantization import FP16_KEEP_FP32_FUSED

    path = copy_of(exported("gpt"))
    quantize(path, mode="fp16", io="fp16", keep_fp32=FP16_KEEP_FP32_FUSED)
    variant = Bundle.open(path).manifest.variants["fp16"]
    float_io = {t.name for t in (*Bundle.open(path).manifest.inputs, *Bundle.open(path).manifest.outputs) if t.dtype == "float32"}
    assert variant.io == dict.fromkeys(float_io, "float16") and "logits" in float_io
    record = check(path, variants=["fp16"])["fp16"]
    assert record["passed"], record
    generator = Generator(path, variant="fp16", provider="cpu")
    assert generator.layout.past_dtype == "float16" and len(generator.generate("If the", max_new_tokens=8)) > 0


@pytest.mark.parametrize("mode", ["int8", pytest.param("int8-static", marks=pytest.mark.slow)])  # one mode in the fast tier
def test_weights_take_7_bits_where_the_cpu_would_saturate_full_range_int8(exported, copy_of, monkeypatch, mode):
    """Both int8 modes run onnxruntime's uint8 × int8 kernels, so both need 7-bit weights there."""
    from onnx import numpy_helper

    from toolkit.compile.quantization import _common

    path = copy_of(exported("mlp"))
    for saturates in (True, False):
        monkeypatch.setattr(_common, "saturating_cpu", lambda saturates=saturates: saturates)
        options = quantize(path, mode=mode, calibration_samples=16).variant(mode).recipe["options"]
        assert options["reduce_range"] is saturates
        if mode == "int8-static":  # the weights the graph holds are what the recipe says
            graph = onnx.load(str(path / f"model.{mode}.onnx")).graph
            weights = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and t.dims]
            assert weights and max(int(abs(w.astype(int)).max()) for w in weights) == (64 if saturates else 127)
    assert quantize(path, mode=mode, reduce_range=False, calibration_samples=16).variant(mode).recipe["options"]["reduce_range"] is False


def test_int8_static_quantizes_only_ops_the_cpu_runs_on_int8(quantized):
    """onnxruntime's quantizer would also quantize LayerNormalization, which the CPU provider runs in
    float between a dequantize and a quantize: its weights would only be rounded to 8 bits."""
    path, _ = quantized("encoder")
    graph = onnx.load(path / "model.int8-static.onnx").graph
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(set(n.input[1:]) <= floats for n in norms)


@pytest.mark.slow  # an int8-static quantization of the encoder of its own: the full suite's
def test_int8_static_keeps_an_additive_mask_and_its_sum_in_float(exported, copy_of, monkeypatch):
    """transformers masks padding by adding finfo.min to the scores: the sum's calibrated range then
    makes an 8-bit step of 1.3e36, and every real score rounds to 0. The sum, the mask and the
    Softmax that reads the sum stay float, and the variant's error is a fraction of what it was."""
    from toolkit.compile.quantization import int8_static

    path = copy_of(exported("userpkg.toy:masked_pooling"))

    def made() -> tuple[dict, float]:
        options = quantize(path, mode="int8-static", smooth=False, trust_source=True).variant("int8-static").recipe["options"]
        return options, check(path, variants=["int8-static"], trust_source=True)["int8-static"]["task_metric"]["value"]

    options, error = made()
    (kept,) = [k for k in options["kept_float"] if "added to" in k["why"]]
    graph = onnx.load(path / "model.int8-static.onnx").graph
    op_of = {n.name: n.op_type for n in graph.node}
    assert sorted(op_of[n] for n in kept["nodes"]) == ["Add", "Softmax", "Where"] and "reaches -3.4e+38: added to" in kept["why"]
    quantized_tensors = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    masked = {o for n in graph.node if n.name in kept["nodes"] and n.op_type != "Softmax" for o in n.output}
    assert masked and not masked & quantized_tensors
    monkeypatch.setattr(int8_static, "_drowned", lambda *_: {})
    unmasked, broken = made()
    assert not [k for k in unmasked.get("kept_float", []) if "added to" in k["why"]] and error < broken / 4, (error, broken)


def test_int8_static_writes_a_graph_output_in_float(exported, copy_of, monkeypatch):
    """A convolution that makes a graph output writes it in float: quantized, the output would be
    clamped to the range calibration saw, and held-out images brighter than the calibration set's
    give outputs past it."""
    from toolkit.compile.quantization import int8_static

    path = copy_of(exported("userpkg.toy:dense_prediction"))

    def made() -> tuple[dict, dict]:
        options = quantize(path, mode="int8-static", trust_source=True).variant("int8-static").recipe["options"]
        return options, check(path, variants=["int8-static"], trust_source=True)["int8-static"]["task_metric"]

    options, metric = made()
    assert [k["outputs"] for k in options["kept_float"] if "outputs" in k] == [["y"]]
    graph = onnx.load(path / "model.int8-static.onnx").graph
    (maker,) = [n for n in graph.node if "y" in n.output]
    assert maker.op_type == "Conv" and options["ops"]["Conv"]["quantized"] == 1  # its weights and input stay int8
    read = {name for n in graph.node for name in n.input}
    assert all(t.name in read for t in graph.initializer)  # the dropped pair's scale and zero point went with it
    assert metric["passed"], metric
    monkeypatch.setattr(int8_static, "_outputs_in_float", lambda _proto: [])
    _, clamped = made()
    assert not clamped["passed"] and clamped["value"] > 10 * metric["value"], (metric, clamped)


@pytest.mark.slow  # two quantizations of their own: the full suite's
def test_calibration_is_made_once_for_the_quantizations_that_share_a_scratch(exported, copy_of, tmp_path):
    """A repair's attempts change only the nodes kept in float: they reuse the build's calibration."""
    path, said = copy_of(exported("mlp")), []
    for method in ("minmax", "minmax", "percentile"):
        quantize(path, mode="int8-static", method=method, calibration_samples=16, scratch=tmp_path, progress=said.append)
    calibrations = [line for line in said if line.startswith("calibrat")]
    assert calibrations == ["calibrating on 16 samples from the model's calibration set (minmax, per channel)",
                            "calibration (minmax, 16 samples) as made before for this model",
                            "calibrating on 16 samples from the model's calibration set (percentile, per channel)"]


def test_a_cpu_is_saturating_when_it_is_x86_without_vnni(monkeypatch, tmp_path):
    import platform

    from toolkit.compile.quantization import _common

    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(_common, "Path", lambda _p: cpuinfo)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    for flags, saturates in (("fpu avx2 fma", True), ("fpu avx2 avx512f avx512_vnni", False), ("fpu avx2 avx_vnni", False)):
        cpuinfo.write_text(f"processor : 0\nflags\t\t: {flags}\n")
        assert _common.saturating_cpu() is saturates
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert _common.saturating_cpu() is False


@pytest.mark.slow  # exports or quantizes a model
def test_int8_that_quantizes_nothing_is_not_made_and_says_what_would(exported, copy_of):
    """A convolution-only model: dynamic int8 leaves every weight in fp32, so no `int8` is stored
    (it would pass its gates and could become best as fp32 under an int8 name)."""
    path = copy_of(exported("userpkg.toy:convolutions"))
    with pytest.raises(ToolkitError, match=r"int8 from variant 'fp32' quantized no weights \(Conv 0/2\).*--mode int8-static"):
        quantize(path, mode="int8", trust_source=True)
    assert set(Bundle.open(path).manifest.variants) == {"fp32"}
    said = []
    quantize(path, mode="int8-static", calibration_samples=64, progress=said.append, trust_source=True)  # what does quantize convolutions
    assert Bundle.open(path).manifest.variants["int8-static"].recipe["options"]["ops"]["Conv"]["quantized"] == 2
    assert "calibrating on 12 samples from the model's calibration set (minmax, per channel)" in said  # what it had, not what was asked


# --- int4 ------------------------------------------------------------------------------------------


def _ops(path, variant):
    graph = onnx.load(str(Bundle.open(path).variant_path(variant))).graph
    weights = {t.name for t in graph.initializer}
    return graph, {n.name: n for n in graph.node}, weights


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["rtn", "hqq", "gptq"])
def test_int4_packs_every_matmul_weight_and_the_head_in_8_bits_and_keeps_the_decoder_agreeing(exported, copy_of, algo):
    path = copy_of(exported("gpt"))
    quantize(path, mode="int4", algo=algo)
    variant = Bundle.open(path).manifest.variants["int4"]
    options = variant.recipe["options"]
    assert variant.precision == "int4" and options["algo"] == algo and options["block_size"] == 32
    graph, nodes, weights = _ops(path, "int4")
    packed = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert packed and all(next(a.i for a in n.attribute if a.name == "block_size") == 32 for n in packed)
    assert all(next(a.i for a in n.attribute if a.name == "accuracy_level") == 4 for n in packed)
    # the head, the MatMul that makes the logits (a decoder's comes last), in 8-bit blocks; the rest in 4
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights] and not options["kept_float"]
    assert [next(a.i for a in n.attribute if a.name == "bits") for n in packed] == [4] * (len(packed) - 1) + [8]
    assert options["head"]["stored"] == "int8" and [n + "_Q8" for n in options["head"]["nodes"]] == [packed[-1].name]
    assert options["ops"]["MatMul"] == {"with_weights": len(packed), "quantized": len(packed), "float": 0}
    record = check(path, variants=["int4"])["int4"]
    metric = record["task_metric"]
    assert record["passed"] and metric["metric"] == "next_token_agreement" and metric["value"] >= 0.9
    assert record["greedy"]["token_agreement"] >= 0.5  # the tiny gpt is trained: its greedy text survives int4


@pytest.mark.slow
@pytest.mark.parametrize("head", ["int4", "float"])
def test_int4_can_store_the_head_in_4_bits_or_float_and_takes_its_options(exported, copy_of, cli, head):
    path = copy_of(exported("gpt"))
    result = cli("quantize", path, "--mode", "int4", "--head", head, "--block-size", "16", "--accuracy-level", "0", "--no-check")
    assert result.exit_code == 0, result.output
    graph, _, weights = _ops(path, "int4")
    float_matmuls = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    options = Bundle.open(path).manifest.variants["int4"].recipe["options"]
    assert float_matmuls == ([] if head == "int4" else options["head"]["nodes"]) and options["head"]["stored"] == head
    packed = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert all(next(a.i for a in n.attribute if a.name == "block_size") == 16 for n in packed)
    assert all(next(a.i for a in n.attribute if a.name == "bits") == 4 for n in packed)
    assert not any(a.name == "accuracy_level" for n in packed for a in n.attribute)  # 0: the provider's choice
    fp32, _, _ = _ops(path, "fp32")
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in fp32.initializer}
    matmul_bytes = sum(arrays[n.input[1]].nbytes for n in fp32.node if n.op_type == "MatMul" and n.input[1] in arrays)
    # 4 bits a weight, and a scale and zero point per 16: under a quarter of the fp32 bytes of what was packed
    bundle = Bundle.open(path)
    assert bundle.variant("fp32").bytes - bundle.variant("int4").bytes > 0.75 * matmul_bytes


def test_int4_refuses_a_model_without_matmul_weights_and_bad_options_leaving_the_bundle_as_it_was(exported, copy_of):
    path = copy_of(exported("mlp"))
    before = (path / "manifest.json").read_bytes()
    with pytest.raises(ToolkitError, match=r"mlp has no MatMul with a constant weight \(its weighted ops: Gemm ×3\); int4 does not apply"):
        quantize(path, mode="int4")
    for options, message in (({"block_size": 24}, "--block-size must be a power of two >= 16"),
                             ({"accuracy_level": 5}, "--accuracy-level must be 0"),
                             ({"algo": "awq"}, "unknown int4 algorithm 'awq'; choose one of rtn, hqq, gptq"),
                             ({"method": "entropy"}, "--method does not apply to --mode int4")):
        with pytest.raises(ToolkitError, match=re.escape(message)):
            quantize(path, mode="int4", **options)
    assert (path / "manifest.json").read_bytes() == before and sorted(p.name for p in path.iterdir() if p.suffix == ".onnx") == ["model.fp32.onnx"]


@pytest.mark.parametrize("name", ZOO)
def test_build_tries_int4_for_transformers_only(exported, name):
    from toolkit.compile.quantization import int4_applies

    reason = int4_applies(Bundle.open(exported(name)))
    assert (reason is not None) == (name in ("encoder", "gpt", "seq2seq")), reason


def test_int8_static_leaves_float_what_only_float_ops_read(quantized):
    """A residual sum that a layer norm reads, quantized, would only be rounded (the layer norm runs
    in float): it stays float, and the MatMul before it writes float (MatMulIntegerToFloat)."""
    path, _ = quantized("encoder")
    graph = onnx.load(path / "model.int8-static.onnx").graph
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(made_by.get(n.input[0]) != "DequantizeLinear" for n in norms)
    assert any(made_by.get(n.input[0]) == "DequantizeLinear" for n in graph.node if n.op_type == "MatMul")  # still int8
    options = Bundle.open(path).manifest.variants["int8-static"].recipe["options"]
    unread = next(k["nodes"] for k in options["kept_float"] if k["why"].startswith("read in float"))
    assert "Add" in {n.op_type for n in graph.node if n.name in unread}


@pytest.mark.parametrize("external", [False, True])  # the model written a weight at a time, or with its weights beside it
def test_smoothing_computes_the_same_function_in_float(exported, tmp_path, monkeypatch, external):
    """Dividing an activation by s and multiplying the weight rows that read it by s changes nothing
    before quantization: the smoothed graph gives the original's outputs, the division folded into
    the layer norm that makes its input and a Mul before the MatMul that reads a GELU."""
    import onnxruntime as ort
    from userpkg.toy import outlier_channels

    from toolkit.compile.quantization.smoothing import smooth

    source = exported("userpkg.toy:outlier_channels") / "model.fp32.onnx"
    x = outlier_channels().calibration_data(32)["x"]
    feeds = [{"x": x[i : i + 1]} for i in range(len(x))]
    if external:
        monkeypatch.setenv("TOOLKIT_EXTERNAL_DATA_BYTES", "4096")
    records = smooth(source, tmp_path / "smoothed.onnx", feeds, dynamic=True)
    assert (tmp_path / "smoothed.onnx.data").is_file() == external
    assert [r["into"] for r in records] == ["node_layer_norm", "Mul"] and all(r["error"][1] < r["error"][0] / 10 for r in records)
    before, after = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (source, tmp_path / "smoothed.onnx"))
    sample = {"x": outlier_channels().sample_data()["x"][:16]}
    np.testing.assert_allclose(after.run(None, sample)[0], before.run(None, sample)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", [pytest.param("int8", marks=pytest.mark.slow), "int8-static"])  # one mode in the fast tier
def test_smoothing_moves_activation_outliers_into_the_weights(exported, copy_of, mode):
    """Outlier channels 150-300× the rest (as a trained BERT's layer norms and GELUs make) leave
    the other channels a few int8 levels: without smoothing the variant is broken; with it, dynamic
    int8 passes its gate with no node kept in fp32, and static's error falls by an order of magnitude."""
    path = copy_of(exported("userpkg.toy:outlier_channels"))

    def error(smooth: bool) -> tuple[float, bool, dict]:
        options = quantize(path, mode=mode, smooth=smooth, trust_source=True).variant(mode).recipe["options"]
        metric = check(path, variants=[mode], trust_source=True)[mode]["task_metric"]
        return metric["value"], metric["passed"], options

    rough, rough_passed, plain = error(False)
    fine, fine_passed, options = error(True)
    assert "smoothed" not in plain and not rough_passed
    assert [r["tensor"] for r in options["smoothed"]] == ["layer_norm", "gelu"] and fine < rough / 10, (fine, rough)
    assert fine_passed or mode == "int8-static"


# --- memory: shape inference without the weights ----------------------------------------------------


def _same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    assert sorted(t.SerializeToString() for t in a.graph.initializer) == sorted(t.SerializeToString() for t in b.graph.initializer)
    assert sorted(v.SerializeToString() for v in a.graph.value_info) == sorted(v.SerializeToString() for v in b.graph.value_info)
    assert [o.SerializeToString() for o in a.graph.output] == [o.SerializeToString() for o in b.graph.output]


@pytest.mark.parametrize("name", ["cnn", "lstm", pytest.param("gpt", marks=pytest.mark.slow)])
def test_pre_processing_makes_what_onnxruntimes_makes_without_holding_the_weights(exported, tmp_path, monkeypatch, name):
    """Quantization's pre-processing infers shapes on the graph with its weights as typed inputs,
    where onnxruntime's quant_pre_process holds the model several times over: the same graph comes
    out, node for node and shape for shape (toolkit's own later steps applied to both). The gpt's
    symbolic shape inference gives up either way, and both go on without it."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from toolkit.compile.passes._graph import prune
    from toolkit.compile.passes.erf_gelu import fuse_erf_gelu
    from toolkit.compile.quantization._common import _PRE_PROCESS

    source = str(Bundle.open(exported(name)).variant_path("fp32"))
    monkeypatch.chdir(tmp_path)  # where a failed symbolic inference leaves its model, as the child's working directory
    child: dict = {}
    exec(_PRE_PROCESS, child)  # the child process's code, run here
    skip = name == "gpt"
    if skip:
        with pytest.raises(Exception, match="Incomplete symbolic shape inference"):
            child["main"](source, str(tmp_path / "ours.onnx"), False, False)
    child["main"](source, str(tmp_path / "ours.onnx"), skip, False)
    quant_pre_process(source, str(tmp_path / "theirs.onnx"), skip_symbolic_shape=skip)
    theirs = onnx.load(str(tmp_path / "theirs.onnx"))
    weights = {t.name for t in theirs.graph.initializer}
    kept = [v for v in theirs.graph.value_info if v.name not in weights]
    del theirs.graph.value_info[:]
    theirs.graph.value_info.extend(kept)
    if fuse_erf_gelu(theirs):
        prune(theirs.graph)
    _same_graph(onnx.load(str(tmp_path / "ours.onnx")), theirs)


def test_fp16_conversion_with_shapes_inferred_without_the_weights_makes_the_same_graph(exported):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from toolkit.compile.passes._graph import record_inferred_shapes

    source = str(Bundle.open(exported("encoder")).variant_path("fp32"))
    options = {"keep_io_types": True, "op_block_list": list(FP16_KEEP_FP32)}
    _same_graph(convert_float_to_float16(record_inferred_shapes(onnx.load(source)), disable_shape_infer=True, **options),
                convert_float_to_float16(onnx.load(source), **options))
