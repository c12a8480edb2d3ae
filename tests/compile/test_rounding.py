"""int8-static's weights rounded for their layer's outputs (quantization/rounding.py, GPTQ at 8 bits)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from toolkit.compile.quantization import quantize
from toolkit.compile.quantization.rounding import _columns, _error, _gptq


@pytest.mark.parametrize(("shape", "kernel", "strides", "dilations", "pads"), [
    ((2, 6, 9, 7), [3, 2], [2, 1], [1, 2], [1, 0, 2, 1]),  # 2-D, pads differ at each end
    ((2, 4, 30), [5], [3], [2], [2, 1]),  # 1-D
])
def test_patches_are_what_the_convolution_multiplies(shape, kernel, strides, dilations, pads):
    """A convolution is its patches times its flattened weight, block by block of input channels."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    weight = rng.standard_normal((5, shape[1], *kernel)).astype(np.float32)
    conv = {"kernel": kernel, "strides": strides, "dilations": dilations, "pads": pads}
    taps, spatial = int(np.prod(kernel)), len(kernel)
    blocks = [(a, min(a + 2 * taps, shape[1] * taps)) for a in range(0, shape[1] * taps, 2 * taps)]
    patches = np.concatenate([_columns(x, conv, block) for block in blocks], axis=1)
    padded = torch.nn.functional.pad(torch.from_numpy(x), [p for a in reversed(range(spatial)) for p in (pads[a], pads[a + spatial])])
    convolve = torch.nn.functional.conv2d if spatial == 2 else torch.nn.functional.conv1d
    expected = convolve(padded, torch.from_numpy(weight), stride=strides, dilation=dilations).numpy()
    np.testing.assert_allclose(patches @ weight.reshape(5, -1).T, np.moveaxis(expected, 1, -1).reshape(-1, 5), atol=1e-4)


def _layer(correlated: bool, outputs: int = 6, inputs: int = 40, rows: int = 400):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((rows, inputs))
    if correlated:  # neighbouring inputs move together, as a convolution's patches do
        x = x @ (np.eye(inputs) + np.eye(inputs, k=1) * 0.9 + np.eye(inputs, k=-1) * 0.9)
    w = rng.standard_normal((outputs, inputs))
    scale = np.abs(w).max(1) / 127
    blocks = [(0, 24), (24, inputs)]
    return w, scale, blocks, [x[:, a:b].T @ x[:, a:b] for a, b in blocks]


def test_uncorrelated_inputs_leave_each_weight_at_its_nearest_level():
    """With a diagonal H no column's error has anywhere to go: GPTQ is round-to-nearest."""
    w, scale, blocks, hessian = _layer(correlated=False)
    diagonal = [np.diag(np.diag(h)) for h in hessian]
    np.testing.assert_array_equal(_gptq(w, scale, blocks, diagonal, 127), np.round(w / scale[:, None]))


def test_correlated_inputs_make_a_smaller_output_error_than_round_to_nearest(monkeypatch):
    from toolkit.compile.quantization import rounding

    w, scale, blocks, hessian = _layer(correlated=True)
    rounded = _gptq(w, scale, blocks, hessian, 127)
    monkeypatch.setattr(rounding, "_LAZY", 5)  # errors carried in batches of 5 columns: the same rounding
    np.testing.assert_array_equal(_gptq(w, scale, blocks, hessian, 127), rounded)
    nearest = np.round(w / scale[:, None])
    assert np.abs(rounded).max() <= 127 and np.all(rounded == np.round(rounded))
    assert not np.array_equal(rounded, nearest)
    assert _error(w, rounded * scale[:, None], blocks, hessian) < 0.7 * _error(w, nearest * scale[:, None], blocks, hessian)


@pytest.mark.slow  # a whole int8-static quantization of the encoder; the rounding itself is tested above
def test_int8_static_rounds_the_weights_for_the_outputs(exported, copy_of, cli):
    """Same graph, same scales, other levels: the held-out error of the outputs falls."""
    from tests.userpkg.toy import convolutions

    path = copy_of(exported("userpkg.toy:convolutions"))
    x = convolutions().sample_data()["x"]

    def outputs(variant: str) -> np.ndarray:
        return ort.InferenceSession(str(path / f"model.{variant}.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    def made(rounding: str) -> tuple[dict, dict[str, np.ndarray], float]:
        options = quantize(path, mode="int8-static", rounding=rounding, trust_source=True).variant("int8-static").recipe["options"]
        graph = onnx.load(str(path / "model.int8-static.onnx")).graph
        weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        return options["rounding"], weights, float(np.sqrt(np.mean((outputs("int8-static") - outputs("fp32")) ** 2)))

    nearest, nearest_weights, nearest_error = made("nearest")
    rounded, rounded_weights, rounded_error = made("gptq")
    assert nearest == {"method": "nearest"}
    assert rounded["method"] == "gptq" and rounded["layers"] == rounded["of"] == 2
    assert rounded["error"][1] < rounded["error"][0]
    assert rounded_weights.keys() == nearest_weights.keys()
    changed = [n for n, w in rounded_weights.items() if not np.array_equal(w, nearest_weights[n])]
    assert changed and all(rounded_weights[n].dtype == np.int8 for n in changed)  # only int8 levels moved, no scale
    assert rounded_error < nearest_error
    result = cli("quantize", path, "--mode", "int8-static", "--rounding", "nearest", "--no-check", "--trust-source")
    assert result.exit_code == 0, result.output
    from toolkit.bundle import Bundle

    assert Bundle.open(path).manifest.variants["int8-static"].recipe["options"]["rounding"] == {"method": "nearest"}
