"""Graph rewrite rules, one test or more per rule. Shape-glue removal (zero initial states, unit
reshapes): what it proves away goes, what it cannot prove stays, and outputs do not change
at any input size."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolkit.compile.passes import run_passes
from toolkit.runtime.session import new_session

H = 8  # hidden size of the synthetic LSTMs


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return new_session(model.SerializeToString(), "cpu").run(None, feeds)


def _same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, shapes: list[tuple[int, ...]]) -> None:
    rng = np.random.default_rng(0)
    for shape in shapes:
        feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
        for expected, got in zip(_run(before, feeds), _run(after, feeds), strict=True):
            np.testing.assert_array_equal(got, expected)


def _model(nodes, initializers, x_shape, opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _ints(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _lstm_weights(prefix: str, features: int) -> list[onnx.TensorProto]:
    rng = np.random.default_rng(len(prefix) + features)
    return [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, f"{prefix}_{n}")
            for n, shape in (("W", (1, 4 * H, features)), ("R", (1, 4 * H, H)), ("B", (1, 8 * H)))]


def _stacked_lstm(state: str = "zero") -> onnx.ModelProto:
    """Two LSTM layers over x (seq, batch, 5), glued the way torch's exporter glues them: one initial
    state expanded to the batch and sliced per layer, and between the layers Transpose + a Reshape to
    a target computed from Shape (seq, 1, batch, H) → (seq, batch, H)."""
    fill = {"zero": 0.0, "half": 0.5}[state]
    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"], start=1, end=2),
        helper.make_node("Concat", ["two", "x_shape", "hidden"], ["state_shape"], axis=0),
        helper.make_node("Expand", ["fill", "state_shape"], ["states"]),
        helper.make_node("Slice", ["states", "zero", "one", "zero"], ["h0"]),
        helper.make_node("Slice", ["states", "one", "two", "zero"], ["h1"]),
        helper.make_node("LSTM", ["x", "l0_W", "l0_R", "l0_B", "", "h0", "h0"], ["y0"], hidden_size=H),
        helper.make_node("Transpose", ["y0"], ["y0_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Shape", ["y0"], ["y0_shape"]),
        helper.make_node("Gather", ["y0_shape", "perm"], ["y0_t_shape"], axis=0),
        helper.make_node("Slice", ["y0_t_shape", "zero", "one"], ["d0"]),
        helper.make_node("Slice", ["y0_t_shape", "one", "two"], ["d1"]),
        helper.make_node("Slice", ["y0_t_shape", "two", "three"], ["d2"]),
        helper.make_node("Slice", ["y0_t_shape", "three", "four"], ["d3"]),
        helper.make_node("Mul", ["d2", "d3"], ["d23"]),
        helper.make_node("Reshape", ["d23", "minus_one"], ["d23_vector"]),
        helper.make_node("Concat", ["d0", "d1", "d23_vector"], ["target"], axis=0),
        helper.make_node("Reshape", ["y0_t", "target"], ["x1"]),
        helper.make_node("LSTM", ["x1", "l1_W", "l1_R", "l1_B", "", "h1", "h1"], ["y"], hidden_size=H),
    ]
    constants = [_ints(n, [v]) for n, v in (("zero", 0), ("one", 1), ("two", 2), ("three", 3), ("four", 4),
                                            ("hidden", H), ("minus_one", -1))]
    constants += [_ints("perm", [0, 2, 1, 3]), numpy_helper.from_array(np.array(fill, dtype=np.float32), "fill")]
    return _model(nodes, constants + _lstm_weights("l0", 5) + _lstm_weights("l1", H), ["seq", "batch", 5])


def test_exporter_glue_around_stacked_lstms_goes_and_outputs_stay():
    before = _stacked_lstm()
    after = onnx.ModelProto.FromString(before.SerializeToString())
    assert run_passes(after, "cuda") == {"zero initial states dropped": 4, "Reshape to Squeeze": 1, "sibling MatMuls packed": 0}
    assert [n.op_type for n in after.graph.node] == ["LSTM", "Squeeze", "LSTM"]
    squeeze = after.graph.node[1]
    assert squeeze.input[0] == "y0"  # the Transpose folded in: (seq, 1, batch, H) squeezed at axis 1
    axes = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}[squeeze.input[1]]
    assert axes.tolist() == [1]
    assert {t.name for t in after.graph.initializer} == {*(f"l{i}_{w}" for i in (0, 1) for w in "WRB"), squeeze.input[1]}
    _same_outputs(before, after, [(1, 1, 5), (7, 3, 5), (2, 9, 5)])


def test_a_nonzero_initial_state_is_kept():
    before = _stacked_lstm("half")
    after = onnx.ModelProto.FromString(before.SerializeToString())
    assert run_passes(after, "cuda") == {"zero initial states dropped": 0, "Reshape to Squeeze": 1, "sibling MatMuls packed": 0}
    assert {"Expand", "Slice"} <= {n.op_type for n in after.graph.node}
    _same_outputs(before, after, [(4, 2, 5)])


@pytest.mark.parametrize("default", [None, "zeros"])  # an initializer that is also an input is only a default
def test_an_initial_state_fed_by_the_caller_is_kept(default):
    initializers = _lstm_weights("l0", 5)
    if default:
        initializers.append(numpy_helper.from_array(np.zeros((1, 2, H), dtype=np.float32), "h"))
    model = _model([helper.make_node("LSTM", ["x", "l0_W", "l0_R", "l0_B", "", "h", "h"], ["y"], hidden_size=H)],
                   initializers, [3, 2, 5])
    model.graph.input.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 2, H]))
    assert run_passes(model, "cuda") == {"zero initial states dropped": 0, "Reshape to Squeeze": 0, "sibling MatMuls packed": 0}
    assert list(model.graph.node[0].input)[5:7] == ["h", "h"]


def _reshape_model(target_nodes, x_shape) -> onnx.ModelProto:
    nodes = [helper.make_node("Shape", ["x"], ["s"]), *target_nodes, helper.make_node("Reshape", ["x", "target"], ["y"])]
    return _model(nodes, [_ints(n, [v]) for n, v in (("zero", 0), ("one", 1), ("two", 2), ("three", 3), ("four", 4))],
                  x_shape)


@pytest.mark.parametrize(("case", "target_nodes", "x_shape"), [
    # (b, s, 4, 8) → (b, s, 32): merges two dims that are not 1
    ("merge", [helper.make_node("Slice", ["s", "zero", "two"], ["bs"]), helper.make_node("Slice", ["s", "two", "three"], ["c"]),
               helper.make_node("Slice", ["s", "three", "four"], ["d"]), helper.make_node("Mul", ["c", "d"], ["cd"]),
               helper.make_node("Concat", ["bs", "cd"], ["target"], axis=0)], ["b", "s", 4, 8]),
    # (b, s, 1, 8) → (s, b, 8): drops the unit dim but swaps the others
    ("reorder", [helper.make_node("Slice", ["s", "one", "two"], ["s1"]), helper.make_node("Slice", ["s", "zero", "one"], ["s0"]),
                 helper.make_node("Slice", ["s", "three", "four"], ["s3"]),
                 helper.make_node("Concat", ["s1", "s0", "s3"], ["target"], axis=0)], ["b", "s", 1, 8]),
    # (b, s, n, 8) → (b, s, 8): n is 1 only when the caller says so
    ("dynamic", [helper.make_node("Slice", ["s", "zero", "two"], ["bs"]), helper.make_node("Slice", ["s", "three", "four"], ["d"]),
                 helper.make_node("Concat", ["bs", "d"], ["target"], axis=0)], ["b", "s", "n", 8]),
    # a target with -1 is the reshape's to infer
    ("inferred", [helper.make_node("Slice", ["s", "zero", "one"], ["b"]), helper.make_node("Concat", ["b", "minus"], ["target"], axis=0)],
     ["b", 1, 8]),
])
def test_a_reshape_it_cannot_prove_a_squeeze_stays(case, target_nodes, x_shape):
    model = _reshape_model(target_nodes, x_shape)
    if case == "inferred":
        model.graph.initializer.append(_ints("minus", [-1]))
    before = onnx.ModelProto.FromString(model.SerializeToString())
    assert run_passes(model, "cuda") == {"zero initial states dropped": 0, "Reshape to Squeeze": 0, "sibling MatMuls packed": 0}
    assert model.graph.node[-1].op_type == "Reshape" and len(model.graph.node) == len(before.graph.node)


@pytest.mark.parametrize("opset", [12, 18])  # Squeeze takes its axes as an attribute before opset 13
def test_a_reshape_dropping_unit_dims_becomes_a_squeeze_in_place_when_the_transpose_reorders(opset):
    """Transpose (a, b, 1, c) → (b, a, 1, c), then Reshape to (b, a, c): the Transpose must stay."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2, 3]),
        helper.make_node("Shape", ["t"], ["s"]),
        helper.make_node("Slice", ["s", "zero", "two"], ["ba"]),
        helper.make_node("Slice", ["s", "three", "four"], ["c"]),
        helper.make_node("Concat", ["ba", "c"], ["target"], axis=0),
        helper.make_node("Reshape", ["t", "target"], ["y"]),
    ]
    before = _model(nodes, [_ints(n, [v]) for n, v in (("zero", 0), ("two", 2), ("three", 3), ("four", 4))], ["a", "b", 1, 6], opset)
    after = onnx.ModelProto.FromString(before.SerializeToString())
    assert run_passes(after, "cuda") == {"zero initial states dropped": 0, "Reshape to Squeeze": 1, "sibling MatMuls packed": 0}
    assert [(n.op_type, n.input[0]) for n in after.graph.node] == [("Transpose", "x"), ("Squeeze", "t")]
    _same_outputs(before, after, [(2, 3, 1, 6), (5, 1, 1, 6)])


def test_a_node_read_only_inside_a_subgraph_is_kept():
    """An If branch reads the Relu's output from the outer scope: pruning must not drop the Relu."""
    branch = helper.make_graph([helper.make_node("Identity", ["r"], ["out"])], "branch", [],
                               [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "zero", "one"], ["b"]),
        helper.make_node("Concat", ["b", "c"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),  # (b, 1, 4) → (b, 4): becomes a Squeeze
        helper.make_node("ReduceSum", ["flat"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero_f"], ["positive"]),
        helper.make_node("If", ["positive"], ["y"], then_branch=branch, else_branch=branch),
    ]
    before = _model(nodes, [_ints("zero", [0]), _ints("one", [1]), _ints("c", [4]),
                            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero_f")], ["b", 1, 4])
    after = onnx.ModelProto.FromString(before.SerializeToString())
    assert run_passes(after, "cuda")["Reshape to Squeeze"] == 1
    assert "Relu" in {n.op_type for n in after.graph.node}
    _same_outputs(before, after, [(3, 1, 4)])


@pytest.mark.parametrize("trans_b", [0, 1])
def test_a_gemm_fed_by_fused_attention_becomes_matmul_and_add(trans_b):
    """onnxscript's attention fusion can leave a Gemm (rank 2 only) reading the 3-D attention output;
    the rule makes the graph load and compute what the flattened Gemm did."""
    from toolkit.compile.passes.attention_gemm import gemms_after_attention_to_matmul

    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((4, 8) if trans_b else (8, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    attention = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["context"], domain="com.microsoft", num_heads=2)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, 8]) for n in ("q", "k", "v")]

    def model(nodes, outputs):
        graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "c")],
                                  value_info=[helper.make_tensor_value_info(n, TensorProto.FLOAT, [6, d]) for n, d in (("context", 8), ("y", 4))
                                              if n not in {o.name for o in outputs}])  # the shapes they had before
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
        proto.ir_version = 10
        return proto

    fused = model([attention, helper.make_node("Gemm", ["context", "w", "c"], ["y"], transB=trans_b), helper.make_node("Relu", ["y"], ["z"])],
                  [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    assert gemms_after_attention_to_matmul(fused) == 1
    # the 2-D shapes recorded for the Gemm's input and output are gone, their types kept
    assert [(v.name, v.type.tensor_type.elem_type, v.type.tensor_type.HasField("shape")) for v in fused.graph.value_info] == \
        [("context", TensorProto.FLOAT, False), ("y", TensorProto.FLOAT, False)]
    assert [n.op_type for n in fused.graph.node] == ["MultiHeadAttention", *(["Transpose"] if trans_b else []), "MatMul", "Add", "Relu"]
    feeds = {n: rng.standard_normal((2, 3, 8)).astype(np.float32) for n in ("q", "k", "v")}
    (context,) = _run(model([attention], [helper.make_tensor_value_info("context", TensorProto.FLOAT, None)]), feeds)
    (got,) = _run(fused, feeds)
    np.testing.assert_allclose(got, np.maximum(context @ (weight.T if trans_b else weight) + bias, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset", [12, 18])  # Split takes its sizes as an input from opset 13
def test_matmuls_sharing_an_input_are_packed_into_one_and_outputs_stay(opset):
    """q, k, v (and a gated MLP's gate and up) read one input: one MatMul over the concatenated weights
    and a Split give the same outputs. A weight the caller may override, or one of another input width,
    keeps its own MatMul."""
    from toolkit.compile.passes.packed_matmul import pack_sibling_matmuls

    rng = np.random.default_rng(0)
    widths = {"wq": 8, "wk": 4, "wv": 4, "wfed": 6}
    initializers = [numpy_helper.from_array(rng.standard_normal((8, n)).astype(np.float32), name) for name, n in widths.items()]
    initializers.append(numpy_helper.from_array(rng.standard_normal((3, 5)).astype(np.float32), "wother"))
    nodes = [helper.make_node("MatMul", ["x", w], [f"{w}_out"], name=w) for w in widths]
    nodes += [helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["x3"]), helper.make_node("MatMul", ["x3", "wother"], ["wother_out"]),
              helper.make_node("Concat", [*(f"{w}_out" for w in widths if w != "wfed"), "wfed_out"], ["qkv"], axis=-1),
              helper.make_node("Concat", ["qkv", "wother_out"], ["y"], axis=-1)]
    initializers += [_ints("starts", [0]), _ints("ends", [3]), _ints("axes", [-1])]
    model = _model(nodes, initializers, ["batch", 3, 8], opset=opset)
    model.graph.input.append(helper.make_tensor_value_info("wfed", TensorProto.FLOAT, [8, 6]))  # an overridable default
    before = onnx.ModelProto()
    before.CopyFrom(model)
    packed = pack_sibling_matmuls(model)
    if opset < 13:
        assert packed == 0
        return
    assert packed == 1
    assert [n.op_type for n in model.graph.node].count("MatMul") == 3  # packed q/k/v, the overridable one, the other width
    (weight,) = [t for t in model.graph.initializer if t.name.endswith("_packed_weight")]
    assert tuple(weight.dims) == (8, 16)
    _same_outputs(before, model, [(1, 3, 8), (4, 3, 8)])


def _erf_gelu(order: str, one: float = 1.0) -> onnx.ModelProto:
    """y = x · 0.5 · (1 + erf(x / √2)) as exporters write it, in one of the orders of the product."""
    c = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("sqrt2", np.sqrt(2.0)), ("one", one), ("half", 0.5))]
    nodes = [helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]), helper.make_node("Add", ["e", "one"], ["p"])]
    nodes += {"half first": [helper.make_node("Mul", ["half", "p"], ["m"]), helper.make_node("Mul", ["x", "m"], ["y"])],
              "x first": [helper.make_node("Mul", ["x", "p"], ["m"]), helper.make_node("Mul", ["m", "half"], ["y"])],
              "half of x": [helper.make_node("Mul", ["x", "half"], ["h"]), helper.make_node("Mul", ["h", "p"], ["y"])]}[order]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], c)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every onnxruntime this package accepts loads
    return model


@pytest.mark.parametrize("order", ["half first", "x first", "half of x"])
def test_an_exact_gelu_in_any_order_becomes_one_gelu_with_the_same_values(order):
    from toolkit.compile.passes.erf_gelu import fuse_erf_gelu

    before = _erf_gelu(order)
    after = onnx.ModelProto()
    after.CopyFrom(before)
    assert fuse_erf_gelu(after) == 1
    assert [(n.op_type, n.domain, list(n.output)) for n in after.graph.node] == [("Gelu", "com.microsoft", ["y"])]
    x = {"x": np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32) * 3}
    np.testing.assert_allclose(new_session(after.SerializeToString(), "cpu").run(None, x)[0],
                               new_session(before.SerializeToString(), "cpu").run(None, x)[0], rtol=1e-6, atol=1e-6)


def test_a_product_that_is_not_a_gelu_stays():
    from toolkit.compile.passes.erf_gelu import fuse_erf_gelu

    assert fuse_erf_gelu(_erf_gelu("half first", one=2.0)) == 0  # 1 + erf is what makes it a GELU


def _rotary(variant: str = "plain") -> onnx.ModelProto:
    """y = x·cos + rotate_half(x)·sin as transformers writes it: x (batch, heads, seq, 8), cos and sin of
    concat(freqs, freqs) unsqueezed on the heads axis; freqs (batch or 1, seq, 4)."""
    c = [_ints("zero", [0]), _ints("half", [4]), _ints("end", [2**62]), _ints("axis", [3]), _ints("heads_axis", [1]),
         numpy_helper.from_array(np.array(0.7, np.float32), "factor")]
    second = "other" if variant == "unequal halves" else "freqs"
    nodes = [helper.make_node("Concat", ["freqs", second], ["angle"], axis=-1),
             helper.make_node("Cos", ["angle"], ["cos_raw"]), helper.make_node("Sin", ["angle"], ["sin_raw"])]
    if variant == "scaled":  # YaRN's attention factor
        nodes += [helper.make_node("Mul", ["cos_raw", "factor"], ["cos_s"]), helper.make_node("Mul", ["factor", "sin_raw"], ["sin_s"])]
    cos, sin = ("cos_s", "sin_s") if variant == "scaled" else ("cos_raw", "sin_raw")
    lower_end = "end" if variant == "not halves" else "half"
    nodes += [helper.make_node("Unsqueeze", [cos, "heads_axis"], ["cos"]), helper.make_node("Unsqueeze", [sin, "heads_axis"], ["sin"]),
              helper.make_node("Slice", ["x", "zero", lower_end, "axis"], ["x1"]), helper.make_node("Slice", ["x", "half", "end", "axis"], ["x2"]),
              helper.make_node("Neg", ["x2"], ["neg"]), helper.make_node("Concat", ["neg", "x1"], ["rotated"], axis=-1)]
    swapped = variant == "swapped"
    nodes += [helper.make_node("Mul", ["cos", "x"] if swapped else ["x", "cos"], ["direct"]),
              helper.make_node("Mul", ["sin", "rotated"] if swapped else ["rotated", "sin"], ["turned"]),
              helper.make_node("Add", ["turned", "direct"] if swapped else ["direct", "turned"], ["y"])]
    rows = 1 if variant == "shared" else "batch"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "seq", 8]),
              helper.make_tensor_value_info("freqs", TensorProto.FLOAT, [rows, "seq", 4]),
              *([helper.make_tensor_value_info("other", TensorProto.FLOAT, [rows, "seq", 4])] if second == "other" else [])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], c)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("variant", ["plain", "shared", "scaled", "swapped"])
def test_a_rotary_embedding_becomes_one_rotary_embedding_with_the_same_values(variant):
    """Per token cos and sin (one row per batch row, or one for all), scaled by a constant or not,
    with the products in either order: one RotaryEmbedding, the same values."""
    from toolkit.compile.passes._graph import prune
    from toolkit.compile.passes.rotary import fuse_rotary_embeddings

    before = _rotary(variant)
    after = onnx.ModelProto()
    after.CopyFrom(before)
    assert fuse_rotary_embeddings(after) == 1
    prune(after.graph)
    ops = [n.op_type for n in after.graph.node]
    assert ops.count("RotaryEmbedding") == 1 and "Neg" not in ops and "Add" not in ops
    rng = np.random.default_rng(0)
    for batch, seq in ((1, 1), (2, 5)):
        feeds = {"x": rng.standard_normal((batch, 3, seq, 8)).astype(np.float32),
                 "freqs": rng.uniform(0, 300, (1 if variant == "shared" else batch, seq, 4)).astype(np.float32)}
        np.testing.assert_allclose(_run(after, feeds)[0], _run(before, feeds)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["unequal halves", "not halves"])
def test_a_product_that_is_not_a_rotary_embedding_stays(variant):
    """Cos and sin whose halves may differ, or a rotation that does not split x in halves, are not
    what RotaryEmbedding computes."""
    from toolkit.compile.passes.rotary import fuse_rotary_embeddings

    assert fuse_rotary_embeddings(_rotary(variant)) == 0


def _attention(variant: str = "grouped") -> onnx.ModelProto:
    """A decoder layer's attention over its cache as the export leaves it: queries (batch, heads, seq,
    4), keys and values (batch, kv heads, seq, 4) concatenated after the past ones, scores scaled and
    masked by an additive (batch, 1, seq, past + seq) mask, softmax, times values. "grouped": 4 query
    heads stacked per each of 2 key-value heads, with the export's Reshapes between grouped and
    per-head; "heads": 4 and 4, no Reshapes; "fused": grouped, q·kᵀ and its scale as one
    FusedMatMul; "rows": grouped, with the projections' rows (batch, seq, heads·4) reshaped into heads
    and transposed (queries and keys through a RotaryEmbedding, whose tables read the seq size off the
    transposed queries) and the output transposed and reshaped back. The rest are graphs the rule must
    leave alone."""
    heads, kv_heads, size = 4, 4 if variant == "heads" else 2, 4
    grouped = variant != "heads"
    f = TensorProto.FLOAT

    def info(name, dims):
        return helper.make_tensor_value_info(name, f, dims)

    def reshaped(source, target, dims, recorded):
        """The export's Reshape of `source` to a shape concatenated from named sizes, its result's
        shape recorded as the exporter records it."""
        value_info.append(info(target, recorded))
        return [helper.make_node("Concat", dims, [f"{target}_shape"], axis=0), helper.make_node("Reshape", [source, f"{target}_shape"], [target])]

    c = [numpy_helper.from_array(np.array(0.5, np.float32), "scale"), _ints("heads", [heads]), _ints("kv_heads", [kv_heads]),
         _ints("size", [size]), _ints("minus_one", [-1])]
    nodes = [helper.make_node("Concat", ["past_key", "key"], ["present_key"], axis=-2),
             helper.make_node("Concat", ["past_value", "value"], ["present_value"], axis=2),
             helper.make_node("Shape", ["query"], ["batch"], start=0, end=1), helper.make_node("Shape", ["query"], ["seq"], start=2, end=3),
             helper.make_node("Shape", ["present_key"], ["total"], start=2, end=3)]
    value_info = []
    if variant == "rows":
        c += [_ints("query_heads", [0, 0, heads, size]), _ints("kv_heads_shape", [0, 0, kv_heads, size]), _ints("rows", [0, 0, heads * size])]
        layout = []
        for name, shape in (("query", "query_heads"), ("key", "kv_heads_shape"), ("value", "kv_heads_shape")):
            rotated = name != "value"
            layout += [helper.make_node("Reshape", [f"{name}_rows", shape], [f"{name}_split"]),
                      helper.make_node("Transpose", [f"{name}_split"], [f"{name}_unrotated" if rotated else name], perm=[0, 2, 1, 3])]
            if rotated:
                layout.append(helper.make_node("RotaryEmbedding", [f"{name}_unrotated", "positions", "cos_table", "sin_table"], [name],
                                               domain="com.microsoft"))
                value_info.append(info(name, ["batch", heads if name == "query" else kv_heads, "seq", size]))
        nodes = layout + nodes
        for node in nodes:
            if node.op_type == "Shape" and node.input[0] == "query":
                node.input[0] = "query_unrotated"
    queries = "query"
    if grouped:
        nodes += reshaped("query", "grouped_query", ["batch", "kv_heads", "minus_one", "size"], ["batch", kv_heads, "group_seq", size])
        queries = "grouped_query"
    if variant == "fused":
        nodes.append(helper.make_node("FusedMatMul", [queries, "present_key"], ["scaled"], domain="com.microsoft", transB=1, alpha=0.5))
    else:
        nodes += [helper.make_node("Transpose", ["present_key"], ["key_t"], perm=[0, 1, 3, 2]),
                  helper.make_node("MatMul", [queries, "key_t"], ["scores"]),
                  helper.make_node("Mul", ["scores", "scale"], ["scaled"])]
    scores = "scaled"
    if grouped:
        nodes += reshaped("scaled", "head_scores", ["batch", "heads", "seq", "total"], ["batch", heads, "seq", "total"])
        scores = "head_scores"
    axis = 1 if variant == "softmax over heads" else -1
    nodes += [helper.make_node("Add", [scores, "mask"], ["masked"]), helper.make_node("Softmax", ["masked"], ["probabilities"], axis=axis)]
    probabilities = "probabilities"
    if grouped:
        nodes += reshaped("probabilities", "grouped_probabilities", ["batch", "kv_heads", "minus_one", "total"], ["batch", kv_heads, "group_seq", "total"])
        probabilities = "grouped_probabilities"
    nodes.append(helper.make_node("MatMul", [probabilities, "present_value"], ["context"]))
    if grouped:
        nodes += [helper.make_node("Concat", ["batch", "heads", "seq", "size"], ["context_shape"], axis=0),
                  helper.make_node("Reshape", ["context", "context_shape"], ["y"])]
    else:
        nodes.append(helper.make_node("Identity", ["context"], ["y"]))
    if variant == "rows":
        nodes[-1].output[0] = "y_heads"
        value_info.append(info("y_heads", ["batch", heads, "seq", size]))
        nodes += [helper.make_node("Transpose", ["y_heads"], ["y_seq"], perm=[0, 2, 1, 3]), helper.make_node("Reshape", ["y_seq", "rows"], ["y"])]
    outputs = [info("y", ["batch", "seq", heads * size] if variant == "rows" else ["batch", heads, "seq", size]), info("present_key", None),
               info("present_value", None)]
    if variant == "keys read elsewhere":
        nodes.append(helper.make_node("ReduceSum", ["present_key"], ["key_sum"]))
        outputs.append(info("key_sum", None))
    if variant == "changed op":  # GroupNormalization 21 normalizes per channel: opset 18's reads per group
        c += [numpy_helper.from_array(np.ones(2, np.float32), "gn_scale"), numpy_helper.from_array(np.zeros(2, np.float32), "gn_bias")]
        nodes.append(helper.make_node("GroupNormalization", ["group_in", "gn_scale", "gn_bias"], ["group_out"], num_groups=2))
    if variant == "rows":
        inputs = [info("query_rows", ["batch", "seq", heads * size]), info("key_rows", ["batch", "seq", kv_heads * size]),
                  info("value_rows", ["batch", "seq", kv_heads * size]), helper.make_tensor_value_info("positions", TensorProto.INT64, ["batch", "seq"]),
                  info("cos_table", ["rows", size // 2]), info("sin_table", ["rows", size // 2])]
    else:
        inputs = [info("query", ["batch", heads, "seq", size]), info("key", ["batch", kv_heads, "seq", size]),
                  info("value", ["batch", kv_heads, "seq", size])]
    inputs += [info("past_key", ["batch", kv_heads, "past", size]),
               info("past_value", ["batch", kv_heads, "past", size]), info("mask", ["batch", 1, "seq", "total"]),
               *([info("group_in", [1, 4, 3])] if variant == "changed op" else [])]
    outputs += [info("group_out", None)] if variant == "changed op" else []
    graph = helper.make_graph(nodes, "g", inputs, outputs, c, value_info=value_info)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def _attention_feeds(rng, batch: int, seq: int, past: int, kv_heads: int, rows: bool) -> dict[str, np.ndarray]:
    """Random queries, keys, values (as heads, or as rows with rotary tables) and cache; a causal mask
    whose batch rows after the first are left-padded (their first positions masked out)."""
    total = past + seq
    keep = np.arange(total)[None, :] <= (past + np.arange(seq))[:, None]
    keep = np.broadcast_to(keep, (batch, 1, seq, total)).copy()
    for row in range(1, batch):
        keep[row, ..., : row + 1] = False
    projections = {"query": rng.standard_normal((batch, 4, seq, 4)).astype(np.float32),
                   "key": rng.standard_normal((batch, kv_heads, seq, 4)).astype(np.float32),
                   "value": rng.standard_normal((batch, kv_heads, seq, 4)).astype(np.float32)}
    if rows:
        angles = rng.uniform(0, 10, (batch * seq, 2)).astype(np.float32)
        projections = {f"{name}_rows": p.transpose(0, 2, 1, 3).reshape(batch, seq, -1) for name, p in projections.items()}
        projections |= {"positions": np.arange(batch * seq).reshape(batch, seq), "cos_table": np.cos(angles), "sin_table": np.sin(angles)}
    return {**projections,
            "past_key": rng.standard_normal((batch, kv_heads, past, 4)).astype(np.float32),
            "past_value": rng.standard_normal((batch, kv_heads, past, 4)).astype(np.float32),
            "mask": np.where(keep, 0.0, np.finfo(np.float32).min).astype(np.float32)}


@pytest.mark.parametrize("variant", ["grouped", "heads", "fused", "rows"])
def test_attention_over_a_cache_becomes_one_attention_with_the_same_values(variant):
    """Grouped-query attention with the export's regrouping Reshapes (q·kᵀ as MatMul of a Transpose
    and a Mul, or one FusedMatMul), or plain multi-head attention: one ONNX Attention at opset 23,
    the same output and present cache, for one token or several, over an empty cache or a full one,
    with left padding (the queries of padding positions aside). On rows, the rotary embeddings take
    the rows as they are and the attention gives rows."""
    from toolkit._onnx import default_opset
    from toolkit.compile.passes._graph import prune
    from toolkit.compile.passes.attention import fuse_attention

    before = _attention(variant)
    after = onnx.ModelProto()
    after.CopyFrom(before)
    assert fuse_attention(after) == 1
    prune(after.graph)
    rows = variant == "rows"
    ops = [n.op_type for n in after.graph.node if n.op_type not in ("Shape", "Identity")]
    assert ops == (["RotaryEmbedding", "RotaryEmbedding", "Attention"] if rows else ["Attention"])  # no Transpose, no Reshape
    assert default_opset(after) == 23
    rng = np.random.default_rng(0)
    kv_heads = 4 if variant == "heads" else 2
    for batch, seq, past in ((1, 1, 5), (3, 4, 6), (2, 3, 0)):
        feeds = _attention_feeds(rng, batch, seq, past, kv_heads, rows)
        expected, got = _run(before, feeds), _run(after, feeds)
        # a query that every key is masked from is padding: the softmax of finfo.min spreads it evenly, the op gives 0
        attended = (feeds["mask"] == 0).any(-1)[:, 0]  # (batch, seq)
        heads_first = (lambda y: y) if rows else (lambda y: y.transpose(0, 2, 1, 3))
        np.testing.assert_allclose(heads_first(got[0])[attended], heads_first(expected[0])[attended], rtol=1e-5, atol=1e-6)
        for cache_expected, cache_got in zip(expected[1:], got[1:], strict=True):
            np.testing.assert_array_equal(cache_got, cache_expected)


@pytest.mark.parametrize("variant", ["softmax over heads", "keys read elsewhere", "changed op"])
def test_what_is_not_attention_over_a_cache_stays(variant):
    """A softmax over another axis is not attention; keys that another node reads between the
    products cannot go into one op; a graph holding an op whose meaning changed by opset 23 cannot
    be raised to it, so nothing in it fuses."""
    from toolkit._onnx import default_opset
    from toolkit.compile.passes.attention import fuse_attention

    model = _attention(variant)
    assert fuse_attention(model) == 0
    assert default_opset(model) == 18 and "Attention" not in [n.op_type for n in model.graph.node]


def test_constants_are_read_only_when_a_rule_asks_for_one():
    """A rule's lookup of a few scalars and shapes converts those alone: a weight it never reads is
    never copied (here one whose data is in a file that does not exist, which reading would fail on)."""
    from toolkit.compile.passes._graph import constants

    weight = onnx.TensorProto(name="weight", data_type=TensorProto.FLOAT, dims=[64, 64], data_location=TensorProto.EXTERNAL)
    weight.external_data.add(key="location", value="nowhere.bin")
    graph = helper.make_graph([helper.make_node("Constant", [], ["axes"], value=_ints("axes", [0, 2]))], "g", [], [],
                              [weight, numpy_helper.from_array(np.array(0.125, np.float32), "scale"), _ints("shape", [1, -1])])
    values = constants(graph)
    assert set(values) == {"weight", "scale", "shape", "axes"}
    assert values.size("weight") == 4096 and values.scalar("weight") is None  # from its dims, its data untouched
    assert values.scalar("scale") == 0.125 and values.scalar("missing") is None
    assert values.is_shape("shape") and values.is_shape("axes") and not values.is_shape("scale")
    assert values["axes"].tolist() == [0, 2]
    with pytest.raises(Exception, match="nowhere.bin|external"):
        values["weight"]
