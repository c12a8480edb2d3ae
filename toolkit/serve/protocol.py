"""Open Inference Protocol (KServe v2) tensors over HTTP: request decoding and response encoding,
JSON and Triton's binary tensor extension. Pure functions over bytes and arrays, no web framework,
so the server stays thin and every rule here is testable on its own.

Binary extension (as Triton and `tritonclient` speak it): the body starts with a JSON header of
`Inference-Header-Content-Length` bytes; each input with `parameters.binary_data_size` takes that
many raw little-endian bytes from what follows, in input order. Outputs go back in binary when the
request asks (`outputs[i].parameters.binary_data` or `parameters.binary_data_output`).

Every request is checked strictly: JSON only (no NaN or Infinity tokens), shape arithmetic in exact
integers under a byte limit, data cast only where no value changes (1.9 is not an INT64, 2**63 is
not either). Anything else is a `ProtocolError` naming the field, answered 400.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from toolkit.spec import TensorSpec

__all__ = ["GENERATE_PARAMETERS", "MAX_STOP", "MAX_STOP_CHARS", "checked_stop", "checked_text", "error_body", "HEADER_LENGTH", "GenerateRequest", "InferRequest", "ProtocolError", "UnencodableOutput", "datatype",
           "decode_generate_request", "decode_request", "dims", "encode_response", "explain_options"]

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_STOP = 16  # stop strings per generate request (OpenAI's API takes 4)
MAX_STOP_CHARS = 256  # characters per stop string: each new token's text is checked against every one
_DATATYPES = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}


class ProtocolError(ValueError):
    """A request the protocol rejects: answered with `status` (400, or 413 past a size limit) and this message."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


class UnencodableOutput(ValueError):
    """An output JSON cannot carry (NaN or Infinity): the answer says so and how to get it in binary."""



def datatype(dtype: str) -> str:
    """The protocol's datatype name for a numpy dtype name ("float32" → "FP32")."""
    return _DATATYPES[np.dtype(dtype).name]


def dims(shape: Sequence[int | str]) -> list[int]:
    """A manifest shape as the protocol writes it: -1 for every dynamic axis."""
    return [d if isinstance(d, int) else -1 for d in shape]


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None  # None: all of them
    binary_outputs: set[str] = field(default_factory=set)
    parameters: dict[str, Any] = field(default_factory=dict)


def decode_request(body: bytes, header_length: str | None, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                   max_bytes: int = 1 << 30) -> InferRequest:
    """Parses an infer request against the model's inputs: names, datatypes, shapes (each input at
    most `max_bytes`), data sizes and values."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not (header_length.isascii() and header_length.isdigit()) or len(header_length) > 19:
            raise ProtocolError(f"{HEADER_LENGTH} must be a byte count, got {header_length[:40]!r}.")
        size = int(header_length)
        if not 0 < size <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} is {size}, but the body has {len(body)} bytes.")
        header, binary = body[:size], body[size:]
    request = _json_object(header, "inputs", list, 'an "inputs" list')
    _optional(request, "id", str, "a string")
    _optional(request, "parameters", dict, "an object")
    _optional(request, "outputs", list, "a list of objects with a name")
    expected = {t.name: t for t in inputs}
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in request["inputs"]:
        if not isinstance(tensor, dict):
            raise ProtocolError('each of "inputs" must be an object with name, shape, datatype and data.')
        name = tensor.get("name")
        if name not in expected:
            raise ProtocolError(f"unknown input {name!r}; the model takes {', '.join(expected)}.")
        if name in arrays:
            raise ProtocolError(f"input {name!r} is given twice.")
        want = datatype(expected[name].dtype)
        if tensor.get("datatype") != want:
            raise ProtocolError(f"input {name!r}: datatype must be {want}, got {tensor.get('datatype')!r}.")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape):
            raise ProtocolError(f"input {name!r}: shape must be a list of integers in [0, 2**63), got {_short(shape)}.")
        if len(shape) != len(expected[name].shape):
            raise ProtocolError(f"input {name!r}: shape {_short(shape)} has {len(shape)} axes; the model takes {len(expected[name].shape)} "
                                f"({dims(expected[name].shape)}).")
        _optional(tensor, "parameters", dict, "an object", f"input {name!r}: ")
        dtype = np.dtype(expected[name].dtype)
        count = math.prod(shape)  # exact: a product past int64 must not wrap around
        if count * dtype.itemsize > max_bytes:
            raise ProtocolError(f"input {name!r}: shape {_short(shape)} of {want} is {count * dtype.itemsize:,} bytes, past this "
                                f"server's limit of {max_bytes:,}.", status=413)
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int):
                raise ProtocolError(f"input {name!r}: binary_data_size must be an integer, got {_short(size)}.")
            if size != count * dtype.itemsize:
                raise ProtocolError(
                    f"input {name!r}: binary_data_size is {size} bytes, but shape {shape} of {want} needs {count * dtype.itemsize}."
                )
            if offset + size > len(binary):
                raise ProtocolError(f"input {name!r}: binary_data_size {size} runs past the end of the body ({len(binary) - offset} bytes left).")
            value = np.frombuffer(binary, dtype=dtype.newbyteorder("<"), count=count, offset=offset).astype(dtype)
            offset += size
        else:
            value = _from_json(name, tensor.get("data"), dtype, count)
        try:
            arrays[name] = value.reshape(shape)
        except ValueError as exc:  # an empty shape whose other sizes numpy cannot hold (such as [2**63 - 1, 0])
            raise ProtocolError(f"input {name!r}: shape {_short(shape)} cannot be held ({exc}).") from None
    if offset != len(binary):
        raise ProtocolError(f"the body has {len(binary) - offset} bytes of binary data that no input claims.")
    return InferRequest(
        id=request.get("id"),
        inputs=arrays,
        outputs=_requested_outputs(request, outputs),
        binary_outputs=_binary_outputs(request, outputs),
        parameters=request.get("parameters") or {},
    )


def _not_json(token: str) -> Any:
    raise ValueError(f"{token} is not JSON (the protocol's JSON has no NaN or Infinity; send such data in binary)")


def _json_object(text: bytes, key: str, kind: type, what: str) -> dict[str, Any]:
    """The request's JSON object, which must hold `key` of type `kind` (`what` in the message)."""
    try:
        request = json.loads(text, parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ProtocolError(f"the request is not valid JSON: {str(exc)[:200]}.") from None
    if not isinstance(request, dict) or not isinstance(request.get(key), kind):
        raise ProtocolError(f"the request must be a JSON object with {what}.")
    return request


def _optional(container: Mapping[str, Any], key: str, kind: type, what: str, where: str = "") -> None:
    value = container.get(key)
    if value is not None and not isinstance(value, kind):
        raise ProtocolError(f'{where}"{key}" must be {what}, got {_short(value)}.')


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _from_json(name: str, data: Any, dtype: np.dtype, count: int) -> np.ndarray:
    """JSON data as `dtype`, only where every value stays what it was: no float into an integer type,
    no integer out of its range, no number where a BOOL goes, nothing past a float type's range."""
    if data is None:
        raise ProtocolError(f'input {name!r} has neither "data" nor parameters.binary_data_size.')
    try:
        value = np.asarray(data).reshape(-1)  # flat or nested, row-major; the dtype JSON gave
    except (TypeError, ValueError, OverflowError, RecursionError):
        raise ProtocolError(f"input {name!r}: data must be a list (flat or nested evenly) of {datatype(dtype.name)} values.") from None
    if value.size != count:
        raise ProtocolError(f"input {name!r}: data has {value.size} elements, the shape needs {count}.")
    if count == 0:
        return value.astype(dtype)
    got, want = value.dtype.kind, datatype(dtype.name)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if got not in "iu":  # floats, or integers numpy could not hold in one integer type (past 64 bits, or mixed signs)
            values = np.asarray(data, dtype=object).reshape(-1)
            if not all(_is_int(v) for v in values):  # a JSON null among them too
                raise ProtocolError(f"input {name!r}: {want} data must be integers, got {_offending(data, _is_int)}.")
            low, high = min(values), max(values)
        else:
            low, high = int(value.min()), int(value.max())
        if low < info.min or high > info.max:
            raise ProtocolError(f"input {name!r}: {low if low < info.min else high} is out of the {want} range [{info.min}, {info.max}].")
    elif dtype.kind == "f":
        if got not in "iuf":
            raise ProtocolError(f"input {name!r}: {want} data must be numbers, got {_offending(data, lambda v: _is_int(v) or isinstance(v, float))}.")
        with np.errstate(over="ignore"):
            cast = value.astype(dtype)
        if not np.isfinite(cast).all():
            raise ProtocolError(f"input {name!r}: data holds a number past the {want} range.")
        return cast
    elif got != "b":
        raise ProtocolError(f"input {name!r}: {want} data must be true or false, got {_offending(data, lambda v: isinstance(v, bool))}.")
    return value.astype(dtype)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _offending(data: Any, fits: Callable[[Any], bool]) -> str:
    """The first value of `data` (flat or nested) that does not fit, for the message."""
    values = np.asarray(data, dtype=object).reshape(-1)
    return _short(next((v for v in values if not fits(v)), values[0]))


def _requested_outputs(request: Mapping[str, Any], outputs: Sequence[TensorSpec]) -> list[str] | None:
    wanted = request.get("outputs")
    if wanted is None:
        return None
    known = [o.name for o in outputs]
    names = []
    for item in wanted:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or name not in known:
            raise ProtocolError(f"unknown output {_short(name)}; the model has {', '.join(known)}.")
        if names.count(name):
            raise ProtocolError(f"output {name!r} is asked for twice.")
        _optional(item, "parameters", dict, "an object", f"output {name!r}: ")
        names.append(name)
    return names


def _binary_outputs(request: Mapping[str, Any], outputs: Sequence[TensorSpec]) -> set[str]:
    if (request.get("parameters") or {}).get("binary_data_output"):
        return {o.name for o in outputs}
    return {
        item["name"] for item in request.get("outputs") or []
        if isinstance(item, dict) and (item.get("parameters") or {}).get("binary_data")
    }


_EXPLAIN_SIZES = ("window", "strides")
_EXPLAIN_COUNTS = {"patch": (1, 1 << 16), "samples": (1, 1000), "seed": (0, 2**63 - 1)}


def explain_options(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The explain extension's options from an infer request's `parameters`: `method`, `target` (a
    class index, one index per axis of the output past its batch axis, or "auto"), `output`, and the method's window, strides, patch, samples and seed;
    each typed here (a ProtocolError naming it), its meaning checked by the method."""
    options: dict[str, Any] = {}
    for name in ("method", "output"):
        if name in parameters:
            if not isinstance(parameters[name], str):
                raise ProtocolError(f"parameters.{name} must be a string, got {_short(parameters[name])}.")
            options[name] = parameters[name]
    if "target" in parameters:
        target = parameters["target"]
        if isinstance(target, list) and 0 < len(target) <= 8 and all(_is_int(i) and 0 <= i < 2**31 for i in target):
            target = tuple(target)  # one index per axis of an output with several past the batch axis
        elif target != "auto" and not (_is_int(target) and 0 <= target < 2**31):
            raise ProtocolError(f"parameters.target must be a class index (an integer >= 0), a list of them (one per axis of the "
                                f"output past its batch axis) or \"auto\", got {_short(target)}.")
        options["target"] = target
    for name in _EXPLAIN_SIZES:
        if name in parameters:
            sizes = parameters[name]
            if not isinstance(sizes, list) or not sizes or len(sizes) > 8 or not all(_is_int(v) and 1 <= v < 2**31 for v in sizes):
                raise ProtocolError(f"parameters.{name} must be a list of sizes (integers >= 1), one per axis past the batch, got {_short(sizes)}.")
            options[name] = tuple(sizes)
    for name, (low, high) in _EXPLAIN_COUNTS.items():
        if name in parameters:
            if not (_is_int(parameters[name]) and low <= parameters[name] <= high):
                raise ProtocolError(f"parameters.{name} must be an integer in [{low}, {high}], got {_short(parameters[name])}.")
            options[name] = parameters[name]
    return options


def encode_response(model: str, request: InferRequest, results: Mapping[str, np.ndarray]) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it (else None)."""
    tensors = []
    chunks = []
    for name, value in results.items():
        tensor: dict[str, Any] = {"name": name, "datatype": datatype(value.dtype.name), "shape": list(value.shape)}
        if name in request.binary_outputs:
            raw = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise UnencodableOutput(f"output {name!r} holds NaN or Infinity, which JSON cannot carry: ask for it in binary "
                                        "(outputs[].parameters.binary_data, or parameters.binary_data_output).")
            tensor["data"] = value.reshape(-1).tolist()
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": tensors}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


@dataclass(frozen=True)
class GenerateRequest:
    """A request to Triton's generate extension: the prompt and how to continue it."""

    text: str
    max_new_tokens: int
    stop: tuple[str, ...]
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None


GENERATE_PARAMETERS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stream")


def decode_generate_request(body: bytes) -> GenerateRequest:
    """Parses `{"text_input": ..., "parameters": {...}}` (parameters may also sit at the top level,
    as Triton accepts them); every value is checked for its type here, its range by the sampler."""
    request = _json_object(body, "text_input", str, 'a "text_input" string')
    parameters = request.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ProtocolError('"parameters" must be a JSON object.')
    p = {**parameters, **{k: v for k, v in request.items() if k not in ("text_input", "parameters")}}
    if unknown := sorted(set(p) - set(GENERATE_PARAMETERS)):
        raise ProtocolError(f"unknown generation parameter {unknown[0]!r}; known: {', '.join(GENERATE_PARAMETERS)}.")
    return GenerateRequest(
        text=request["text_input"],
        max_new_tokens=_number(p, "max_tokens", int, 64),
        stop=checked_stop(p.get("stop")),
        temperature=_number(p, "temperature", float, 0.0),
        top_k=_number(p, "top_k", int, None),
        top_p=_number(p, "top_p", float, None),
        seed=_number(p, "seed", int, None),
    )


# What each numeric generation parameter may be: [low, high] (the sampler checks the finer rules).
_RANGES = {"max_tokens": (1, 2**31 - 1), "top_k": (1, 2**31 - 1), "seed": (0, 2**63 - 1), "temperature": (0.0, 1e6), "top_p": (0.0, 1.0)}


def _number(parameters: Mapping[str, Any], name: str, kind: type, default: Any) -> Any:
    value = parameters.get(name, default)
    if value is None or value is default:
        return value
    integral = isinstance(value, int) or isinstance(value, float) and value.is_integer()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not integral):
        raise ProtocolError(f"{name!r} must be {'an integer' if kind is int else 'a number'}, got {_short(value)}.")
    low, high = _RANGES[name]
    if not low <= value <= high:
        raise ProtocolError(f"{name!r} must lie in [{low}, {high}], got {_short(value)}.")
    return kind(value)


def checked_text(text: str, param: str, max_bytes: int) -> str:
    """`text` if it is valid Unicode of at most `max_bytes` in UTF-8, else a ProtocolError naming `param`."""
    if len(text) > max_bytes:  # before encoding: a character is at least one byte
        raise ProtocolError(f"{param!r} is over {max_bytes:,} bytes, this server's limit for a prompt.", 413, param)
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ProtocolError(f"{param!r} holds a lone surrogate ({text[exc.start]!r} at character {exc.start}); text must be "
                            "valid Unicode.", param=param) from None
    if size > max_bytes:
        raise ProtocolError(f"{param!r} is {size:,} bytes, over this server's limit of {max_bytes:,} for a prompt.", 413, param)
    return text


def checked_stop(stop: Any, param: str = "stop") -> tuple[str, ...]:
    """The stop strings of a request: a string or a list of strings, at most MAX_STOP of at most
    MAX_STOP_CHARS characters each."""
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ProtocolError(f"{param!r} must be a string or a list of strings.", param=param)
    if len(stop) > MAX_STOP:
        raise ProtocolError(f"{param!r} has {len(stop)} strings; this server takes at most {MAX_STOP}.", param=param)
    for s in stop:
        if len(s) > MAX_STOP_CHARS:
            raise ProtocolError(f"a stop string is {len(s)} characters; this server takes at most {MAX_STOP_CHARS}.", param=param)
        checked_text(s, param, 4 * MAX_STOP_CHARS)
    return tuple(stop)


def error_body(path: str, status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """An error answer: `{"error": message}` on the v2 routes, OpenAI's shape on /v1 (what its clients parse)."""
    if not path.startswith("/v1/"):
        return {"error": message}
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(status)
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": "model_not_found" if status == 404 and param == "model" else None}}
