"""Property-based tests of the protocol decoders (hypothesis): whatever the body, header and values,
the answer is a clean ProtocolError (a 4xx) or a request whose tensors are exactly what was sent,
in the model's dtypes and the shapes given; never another exception."""

from __future__ import annotations

import json
import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolkit.serve.protocol import HEADER_LENGTH, ProtocolError, decode_generate_request, decode_request
from toolkit.spec import TensorSpec

INPUTS = [TensorSpec("x", "float32", ("batch", 3)), TensorSpec("ids", "int64", ("batch", "seq")), TensorSpec("flag", "bool", ("batch",)),
          TensorSpec("small", "uint8", ("batch",))]
OUTPUTS = [TensorSpec("y", "float32", ("batch",)), TensorSpec("z", "int64", ("batch",))]
DTYPES = {"x": "FP32", "ids": "INT64", "flag": "BOOL", "small": "UINT8"}
BOUNDED = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=4))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                           max_leaves=12)
shapes = st.lists(st.integers(min_value=-2, max_value=6) | st.sampled_from([0, 2**31, 2**40, 2**62, 2**63 - 1, 2**63, 2**64]) | scalars,
                  max_size=3)


@st.composite
def tensors(draw):
    """Mostly well-formed tensor objects, any field of which may be wrong."""
    name = draw(st.sampled_from(list(DTYPES)) | st.text(max_size=3))
    shape = draw(shapes)
    count = math.prod(shape) if all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 8 for d in shape) else 3
    element = draw(st.sampled_from([st.integers(-300, 300), st.integers(-(2**65), 2**65), st.floats(-1e40, 1e40, allow_nan=False),
                                    st.booleans(), scalars]))
    tensor = {"name": name, "shape": shape, "datatype": draw(st.sampled_from([DTYPES.get(name, "FP32"), "FP64", "INT32", 3])),
              "data": draw(st.lists(element, min_size=count, max_size=count) | json_values)}
    for key in draw(st.sets(st.sampled_from(["datatype", "data", "shape", "name"]), max_size=1)):
        del tensor[key]
    if draw(st.booleans()):
        tensor["parameters"] = draw(json_values)
    return tensor


@st.composite
def requests(draw):
    request = {"inputs": draw(st.lists(tensors(), max_size=3) | json_values)}
    for key, values in (("outputs", st.lists(st.fixed_dictionaries({"name": st.sampled_from(["y", "z", "w"]) | scalars})) | json_values),
                        ("parameters", json_values), ("id", json_values)):
        if draw(st.booleans()):
            request[key] = draw(values)
    return request


def _check_decoded(request: dict, decoded) -> None:
    """What the decoder accepted is exactly what was sent."""
    for tensor in request["inputs"]:
        spec = next(t for t in INPUTS if t.name == tensor["name"])
        value = decoded.inputs[spec.name]
        assert value.dtype == np.dtype(spec.dtype) and value.shape == tuple(tensor["shape"])
        sent = np.asarray(tensor["data"], dtype=object).reshape(-1).tolist()
        if spec.dtype == "float32":
            np.testing.assert_array_equal(value.reshape(-1), np.asarray(sent, dtype=np.float64).astype(np.float32))
        else:
            assert value.reshape(-1).tolist() == sent  # no truncation, no wrap-around


@BOUNDED
@given(requests())
def test_a_json_request_is_refused_cleanly_or_decoded_exactly(request):
    body = json.dumps(request).encode()
    try:
        decoded = decode_request(body, None, INPUTS, OUTPUTS, max_bytes=1 << 20)
    except ProtocolError as exc:
        assert exc.status in (400, 413) and str(exc)
        return
    _check_decoded(request, decoded)


@BOUNDED
@given(st.binary(max_size=300), st.none() | st.text(max_size=24) | st.integers(-5, 400).map(str))
def test_any_bytes_and_header_length_are_refused_cleanly(body, header_length):
    try:
        decode_request(body, header_length, INPUTS, OUTPUTS, max_bytes=1 << 20)
    except ProtocolError as exc:
        assert exc.status in (400, 413)


@BOUNDED
@given(st.lists(st.tuples(st.sampled_from(list(DTYPES)), st.lists(st.integers(0, 4), min_size=1, max_size=2)), min_size=1, max_size=3),
       st.integers(-8, 8), st.binary(max_size=16), st.booleans())
def test_binary_tensors_are_refused_cleanly_or_decoded_exactly(tensors, size_error, extra, declare_wrong_header):
    """Binary bodies with sizes right or wrong by a few bytes, trailing bytes, a wrong header length."""
    specs = {t.name: t for t in INPUTS}
    rng = np.random.default_rng(0)
    header, chunks, sent = {"inputs": []}, [], {}
    for i, (name, shape) in enumerate(tensors):
        dtype = np.dtype(specs[name].dtype)
        value = rng.integers(0, 2, size=shape).astype(dtype) if dtype.kind == "b" else rng.integers(0, 200, size=shape).astype(dtype)
        raw = value.astype(dtype.newbyteorder("<")).tobytes()
        header["inputs"].append({"name": name, "shape": shape, "datatype": DTYPES[name],
                                 "parameters": {"binary_data_size": len(raw) + (size_error if i == 0 else 0)}})
        chunks.append(raw)
        sent.setdefault(name, value)
    head = json.dumps(header).encode()
    body = head + b"".join(chunks) + extra
    length = str(len(head) + (1 if declare_wrong_header else 0))
    try:
        decoded = decode_request(body, length, INPUTS, OUTPUTS, max_bytes=1 << 20)
    except ProtocolError as exc:
        assert exc.status in (400, 413)
        return
    assert not size_error and not extra and not declare_wrong_header and len({n for n, _ in tensors}) == len(tensors)
    for name, value in sent.items():
        np.testing.assert_array_equal(decoded.inputs[name], value)


@BOUNDED
@given(st.dictionaries(st.sampled_from(["text_input", "parameters", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop",
                                        "stream", "other"]), json_values, max_size=6))
def test_a_generate_request_is_refused_cleanly_or_typed(request):
    try:
        decoded = decode_generate_request(json.dumps(request).encode())
    except ProtocolError as exc:
        assert exc.status == 400
        return
    assert isinstance(decoded.text, str) and isinstance(decoded.max_new_tokens, int) and decoded.max_new_tokens >= 1
    assert all(isinstance(s, str) for s in decoded.stop) and isinstance(decoded.temperature, float)


def test_the_header_length_is_a_plain_byte_count():
    for header_length in ("", "-1", "1e3", "０", "9" * 40):
        try:
            decode_request(b"{}", header_length, INPUTS, OUTPUTS)
        except ProtocolError as exc:
            assert HEADER_LENGTH in str(exc)
        else:
            raise AssertionError(f"{header_length!r} was accepted")
