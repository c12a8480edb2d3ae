"""toolkit._onnx.save_model: a model written a weight at a time is the same model."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"w{i}") for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"], [f"h{i + 1}" if i < 2 else "y"], name=f"mm{i}") for i in range(3)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 8])], weights)
    graph.doc_string = "kept"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    model.metadata_props.add(key="k", value="v")
    return model


@pytest.mark.parametrize("external", [False, True])
def test_a_model_written_a_weight_at_a_time_is_the_same_model(tmp_path, monkeypatch, external):
    from toolkit._onnx import save_model

    if external:
        monkeypatch.setenv("TOOLKIT_EXTERNAL_DATA_BYTES", "100")
    model = _model()
    written = save_model(onnx.ModelProto.FromString(model.SerializeToString()), tmp_path / "m.onnx")
    assert written == (["m.onnx.data"] if external else [])
    loaded = onnx.load(str(tmp_path / "m.onnx"))
    assert loaded.graph.node == model.graph.node and loaded.graph.doc_string == "kept" and loaded.metadata_props == model.metadata_props
    assert [numpy_helper.to_array(t).tolist() for t in loaded.graph.initializer] == [numpy_helper.to_array(t).tolist() for t in model.graph.initializer]
    assert not (tmp_path / "m.onnx.partial").exists()


@pytest.mark.parametrize("external", [False, True])
def test_each_weight_is_written_as_transformed(tmp_path, monkeypatch, external):
    from toolkit._onnx import save_model

    if external:
        monkeypatch.setenv("TOOLKIT_EXTERNAL_DATA_BYTES", "100")
    model = _model()
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    def doubled(tensor: onnx.TensorProto) -> onnx.TensorProto:
        return numpy_helper.from_array(numpy_helper.to_array(tensor) * 2, tensor.name) if tensor.name == "w1" else tensor

    save_model(model, tmp_path / "m.onnx", doubled)
    loaded = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    np.testing.assert_array_equal(loaded["w1"], original["w1"] * 2)
    np.testing.assert_array_equal(loaded["w0"], original["w0"])


def test_the_models_size_is_counted_without_serializing_it():
    """model_bytes decides external data as ByteSize() would, without its transient copy."""
    from toolkit._onnx import model_bytes

    model = _model()
    assert abs(model_bytes(model) - model.ByteSize()) < 0.05 * model.ByteSize()
