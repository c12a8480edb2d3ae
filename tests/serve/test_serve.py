"""`toolkit serve` on a real uvicorn server bound to a free loopback port: the official tritonclient
HTTP client (binary and JSON tensors), a plain HTTP client, every documented error, concurrent
requests that each get their own rows back, generation, metrics; and `toolkit package --triton`."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest

from tests.serve.cli_server import cli_server
from toolkit.runtime.model import Model
from toolkit.runtime.samples import make_feeds
from toolkit.serve.app import ServeOptions, create_app
from toolkit.serve.batching import DeadlinePassed, DynamicBatcher, Overloaded

TOKEN = "s3cret"


@contextmanager
def running(models, options, loader=None, tls=None):
    """A uvicorn server in a thread, on a socket bound here first (no race for a free port under
    pytest -n), yielding its address once it has started; over TLS with `tls` (toolkit.serve.tls.TLS)."""
    import uvicorn

    class Server(uvicorn.Server):
        up = threading.Event()

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            self.up.set()

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = Server(uvicorn.Config(create_app(models, options, loader), log_level="warning", **(tls.uvicorn() if tls else {})))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert server.up.wait(30), "the server did not start"
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


# The conformance tests run against both backends; Ray's start-up costs seconds, so its half is slow,
# and on one xdist worker (--dist loadgroup) so that one Ray instance serves the whole module.
BACKENDS = ["native", pytest.param("ray", marks=[pytest.mark.slow, pytest.mark.xdist_group("ray")])]
RAY_REPLICA = {"num_cpus": 0.25, "threads": 1, "provider": "cpu"}  # every deployment of the module fits Ray's 2 CPUs


@pytest.fixture(scope="module")
def models(exported):
    return {name: Model(exported(name), provider="cpu") for name in ("mlp", "encoder", "gpt")}


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def ray_http():
    """One Ray instance for the module, sized as CI's machine, its Serve proxy on a free loopback port;
    shut down at the end, leaving no process behind."""
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 << 20)
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


@contextmanager
def deployed(port, name, bundles, options, **ray_options):
    """The bundles served by Ray under /NAME (/ for "server"), yielding the address clients use."""
    from ray import serve

    from toolkit.serve.ray_backend import RayOptions, application

    prefix = "/" if name == "server" else f"/{name}"
    serve.run(application(bundles, options, RayOptions(**RAY_REPLICA | ray_options)), name=name, route_prefix=prefix)
    try:
        yield f"127.0.0.1:{port}{prefix.rstrip('/')}"
    finally:
        serve.delete(name)


@contextmanager
def serving(backend, request, models, options):
    if backend == "native":
        with running(models, options) as address:
            yield address
    else:
        name = "server" if options.token is None else "guarded"
        with deployed(request.getfixturevalue("ray_http"), name, [m.bundle.path for m in models], options) as address:
            yield address


@pytest.fixture(scope="module")
def server(backend, models, request):
    with serving(backend, request, list(models.values()), ServeOptions(max_batch=16, max_delay_ms=20)) as address:
        yield address


@pytest.fixture(scope="module")
def guarded(backend, models, request):
    """A server with a bearer token and a 4 KiB body limit."""
    with serving(backend, request, [models["mlp"]], ServeOptions(token=TOKEN, max_body_bytes=4096)) as address:
        yield address


def _feeds(model, batch=2, seed=0):
    return make_feeds(model.inputs, {"batch": batch, "seq": 7}, seed)


def test_tritonclient_health_metadata_and_config(server):
    import tritonclient.http as triton
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    client = triton.InferenceServerClient(server)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("encoder")
    assert {"binary_tensor_data", "model_configuration", "generate"} <= set(client.get_server_metadata()["extensions"])
    meta = client.get_model_metadata("encoder")
    assert meta["inputs"] == [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                              {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}]
    config = json_format.ParseDict(client.get_model_config("encoder"), model_config_pb2.ModelConfig())
    assert config.max_batch_size == 16 and config.platform == "onnxruntime_onnx"
    assert [(i.name, list(i.dims), i.data_type) for i in config.input] == [
        ("input_ids", [-1], model_config_pb2.TYPE_INT64), ("attention_mask", [-1], model_config_pb2.TYPE_INT64)]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("name", ["mlp", "encoder"])
def test_tritonclient_infer_matches_the_runtime(server, models, name, binary):
    import tritonclient.http as triton

    model = models[name]
    feeds = _feeds(model, batch=3, seed=4)
    inputs = []
    for t in model.inputs:
        tensor = triton.InferInput(t.name, list(feeds[t.name].shape), {"float32": "FP32", "int64": "INT64"}[t.dtype])
        tensor.set_data_from_numpy(feeds[t.name], binary_data=binary)
        inputs.append(tensor)
    outputs = [triton.InferRequestedOutput(o.name, binary_data=binary) for o in model.outputs]
    result = triton.InferenceServerClient(server).infer(name, inputs, outputs=outputs, request_id="r-7")
    assert result.get_response()["id"] == "r-7"
    want = model.run(feeds)
    for o in model.outputs:
        np.testing.assert_allclose(result.as_numpy(o.name), want[o.name], rtol=1e-5, atol=1e-6)


def test_plain_json_with_nested_data_and_requested_outputs(server, models):
    model = models["gpt"]
    feeds = make_feeds(model.inputs, {"batch": 1, "seq": 3, "past": 2}, seed=1)
    request = {"id": "abc", "inputs": [{"name": k, "shape": list(v.shape), "datatype": "INT64" if v.dtype == np.int64 else "FP32",
                                        "data": v.tolist()} for k, v in feeds.items()], "outputs": [{"name": "logits"}]}
    response = httpx.post(f"http://{server}/v2/models/gpt/infer", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "abc" and [o["name"] for o in body["outputs"]] == ["logits"]
    logits = np.asarray(body["outputs"][0]["data"], dtype=np.float32).reshape(body["outputs"][0]["shape"])
    np.testing.assert_allclose(logits, model.run(feeds)["logits"], rtol=1e-5, atol=1e-5)


def test_explain_attributes_each_input_through_the_batcher(server, models):
    """The explain extension: the attributions `toolkit.explain` gives, for an image-like input and
    for token ids (removed through the attention mask), named after the inputs they explain."""
    import toolkit

    feeds = _feeds(models["mlp"])
    body = {"inputs": [{"name": "x", "shape": list(feeds["x"].shape), "datatype": "FP32", "data": feeds["x"].ravel().tolist()}],
            "parameters": {"method": "occlusion", "window": [16], "strides": [8], "target": 3}}
    answer = httpx.post(f"http://{server}/v2/models/mlp/explain", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in answer.json()["outputs"]}
    want = toolkit.explain(models["mlp"], feeds, method="occlusion", window=(16,), strides=(8,), target=3)
    assert set(outputs) == {"x_attribution", "target", "score"} and outputs["target"].tolist() == [3, 3]
    np.testing.assert_allclose(outputs["x_attribution"], want.attributions["x"], rtol=1e-4, atol=1e-5)
    text = _feeds(models["encoder"])
    body = {"inputs": [{"name": n, "shape": list(v.shape), "datatype": "INT64", "data": v.ravel().tolist()} for n, v in text.items()],
            "parameters": {"method": "shapley", "samples": 2, "seed": 1}}
    answer = httpx.post(f"http://{server}/v2/models/encoder/explain", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    got = next(np.array(o["data"]).reshape(o["shape"]) for o in answer.json()["outputs"] if o["name"] == "input_ids_attribution")
    want = toolkit.explain(models["encoder"], text, method="shapley", samples=2, seed=1)
    np.testing.assert_allclose(got, want.attributions["input_ids"], rtol=1e-4, atol=1e-5)
    body["parameters"] = {"method": "kernel-shap", "samples": 12, "seed": 2}
    answer = httpx.post(f"http://{server}/v2/models/encoder/explain", json=body, timeout=60)
    got = next(np.array(o["data"]).reshape(o["shape"]) for o in answer.json()["outputs"] if o["name"] == "input_ids_attribution")
    want = toolkit.explain(models["encoder"], text, method="kernel-shap", samples=12, seed=2)
    np.testing.assert_allclose(got, want.attributions["input_ids"], rtol=1e-3, atol=1e-4)
    for parameters, message in [({"method": "lime"}, "unknown method 'lime'"), ({"window": "16"}, "parameters.window must be a list"),
                                ({"target": -1}, "parameters.target must be a class index"),
                                ({"method": "integrated-gradients"}, "runs on the bundle's PyTorch source"),
                                ({"method": "rollout"}, "not a served model's answers"),
                                ({"method": "occlusion", "samples": 2}, "occlusion takes window, strides, baseline; not samples")]:
        refused = httpx.post(f"http://{server}/v2/models/mlp/explain", json=_mlp_request() | {"parameters": parameters})
        assert refused.status_code == 400 and message in refused.json()["error"], refused.text
    assert "explain" in httpx.get(f"http://{server}/v2").json()["extensions"]


def _mlp_request(rows=1, **changes):
    tensor = {"name": "x", "shape": [rows, 784], "datatype": "FP32", "data": [0.5] * (rows * 784)} | changes
    return {"inputs": [tensor]}


@pytest.mark.parametrize(
    ("path", "content", "headers", "status", "message"),
    [
        ("mlp", _mlp_request(shape=[1, 783]), {}, 400, "input 'x': data has 784 elements, the shape needs 783"),
        ("mlp", _mlp_request(shape=[2, 392]), {}, 400, "input 'x': axis 1 must be 784, got 392"),
        ("mlp", _mlp_request(datatype="FP64"), {}, 400, "input 'x': datatype must be FP32, got 'FP64'"),
        ("mlp", _mlp_request(name="pixels"), {}, 400, "unknown input 'pixels'; the model takes x"),
        ("mlp", b'{"inputs": [', {}, 400, "the request is not valid JSON"),
        ("mlp", {"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "parameters": {"binary_data_size": 3136}}]},
         {"binary": 200}, 400, "input 'x': binary_data_size 3136 runs past the end of the body (200 bytes left)"),
        ("mlp", {"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "parameters": {"binary_data_size": 3135}}]},
         {"binary": 3135}, 400, "binary_data_size is 3135 bytes, but shape [1, 784] of FP32 needs 3136"),
        ("mlp", _mlp_request(), {"outputs": "nope"}, 400, "unknown output 'nope'; the model has logits"),
        ("resnet", _mlp_request(), {}, 404, "unknown model 'resnet'; this server has mlp, encoder, gpt"),
        ("mlp", _mlp_request(rows=64), {}, 413, "this server accepts at most"),
        ("mlp", _mlp_request(shape=[2**40, 2**40]), {}, 413, "input 'x': shape [1099511627776, 1099511627776] of FP32 is"),
        ("mlp", _mlp_request(shape=[2**64, 784]), {}, 400, "input 'x': shape must be a list of integers in [0, 2**63)"),
        ("mlp", _mlp_request(shape=[-1, 784]), {}, 400, "input 'x': shape must be a list of integers in [0, 2**63)"),
        ("mlp", _mlp_request() | {"parameters": [1]}, {}, 400, '"parameters" must be an object, got [1]'),
        ("mlp", _mlp_request() | {"outputs": {"name": "logits"}}, {}, 400, '"outputs" must be a list of objects with a name'),
        ("mlp", _mlp_request(parameters="x"), {}, 400, "input 'x': \"parameters\" must be an object"),
        ("mlp", _mlp_request() | {"id": 7}, {}, 400, '"id" must be a string, got 7'),
        ("mlp", b'{"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [NaN]}]}', {}, 400,
         "NaN is not JSON"),
        ("mlp", _mlp_request(data=[0.5] * 783 + [1e39]), {}, 400, "input 'x': data holds a number past the FP32 range"),
        ("mlp", _mlp_request(data=[0.5] * 783 + ["a"]), {}, 400, "input 'x': FP32 data must be numbers, got 'a'"),
        ("encoder", {"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [1.9, 2.7]},
                                {"name": "attention_mask", "shape": [1, 2], "datatype": "INT64", "data": [1, 1]}]}, {}, 400,
         "input 'input_ids': INT64 data must be integers, got 1.9"),
        ("encoder", {"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [1, None]},
                                {"name": "attention_mask", "shape": [1, 2], "datatype": "INT64", "data": [1, 1]}]}, {}, 400,
         "input 'input_ids': INT64 data must be integers, got None"),
        ("encoder", {"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [1, 2**63]},
                                {"name": "attention_mask", "shape": [1, 2], "datatype": "INT64", "data": [1, 1]}]}, {}, 400,
         "input 'input_ids': 9223372036854775808 is out of the INT64 range"),
        ("mlp", {"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "parameters": {"binary_data_size": "3136"}}]},
         {"binary": 3136}, 400, "input 'x': binary_data_size must be an integer, got '3136'"),
        ("gpt/generate", {"text_input": "x", "parameters": {"max_tokens": "12"}}, {}, 400, "'max_tokens' must be an integer, got '12'"),
        ("gpt/generate", {"text_input": "x", "parameters": {"max_tokens": 10**400}}, {}, 400, "'max_tokens' must lie in [1, 2147483647]"),
        ("gpt/generate", {"text_input": "x", "parameters": {"max_tokens": True}}, {}, 400, "'max_tokens' must be an integer, got True"),
        ("gpt/generate", {"text_input": "x", "parameters": ["max_tokens"]}, {}, 400, '"parameters" must be a JSON object'),
        ("gpt/generate", {"text_input": "x", "seed": -1}, {}, 400, "'seed' must lie in [0, 9223372036854775807], got -1"),
        ("gpt/generate", {"text_input": 5}, {}, 400, 'the request must be a JSON object with a "text_input" string'),
        ("mlp/generate", {"text_input": "x"}, {}, 400, "model 'mlp' is not a decoder with a KV cache"),
        ("x" * 300, _mlp_request(), {}, 404, "unknown model 'xxxxxxxx"),
        ("gpt/generate", {"text_input": "ab\ud800"}, {}, 400, "'text_input' holds a lone surrogate ('\\ud800' at character 2)"),
        ("gpt/generate", {"text_input": "x", "stop": ["a"] * 5000}, {}, 400, "'stop' has 5000 strings; this server takes at most 16"),
        ("gpt/generate", {"text_input": "x", "max_tokens": 500}, {}, 400, "beyond the model's context of 128 tokens"),
    ],
    ids=["shape-vs-data", "wrong-shape", "wrong-datatype", "unknown-input", "malformed-json", "binary-too-short",
         "binary-length-mismatch", "unknown-output", "unknown-model", "oversized-body", "shape-product-past-int64",
         "dim-past-int64", "negative-dim", "parameters-not-object", "outputs-not-list", "tensor-parameters-not-object",
         "id-not-string", "nan-token", "float-past-fp32", "string-in-fp32", "float-into-int64", "null-into-int64", "int64-out-of-range",
         "binary-size-not-int", "max-tokens-string", "max-tokens-huge", "max-tokens-bool", "generate-parameters-not-object",
         "negative-seed", "text-input-not-string", "generate-on-encoder-only", "long-unknown-model", "lone-surrogate", "thousands-of-stops",
         "past-the-context"],
)
def test_bad_requests_get_their_status_and_a_message_naming_the_problem(server, guarded, path, content, headers, status, message):
    address, auth = (guarded, {"Authorization": f"Bearer {TOKEN}"}) if status == 413 else (server, {})
    if "outputs" in headers:
        content = content | {"outputs": [{"name": headers["outputs"]}]}
    body = content if isinstance(content, bytes) else json.dumps(content).encode()
    if "binary" in headers:
        auth = auth | {"Inference-Header-Content-Length": str(len(body))}
        body += b"\0" * headers["binary"]
    route = path if "/" in path else f"{path}/infer"
    response = httpx.post(f"http://{address}/v2/models/{route}", content=body, headers=auth)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert "Traceback" not in response.text and "Error:" not in response.text  # no exception type or trace reaches the client


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", TOKEN], ids=["missing", "wrong", "no-scheme"])
def test_the_token_guards_every_route_but_health(guarded, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    for path in ("/v2", "/v2/models/mlp", "/metrics"):
        response = httpx.get(f"http://{guarded}{path}", headers=headers)
        assert response.status_code == 401 and "API key" in response.json()["error"]
    assert httpx.get(f"http://{guarded}/v2/health/ready", headers=headers).status_code == 200
    assert httpx.get(f"http://{guarded}/v2/models/mlp", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_concurrent_requests_merge_into_batches_and_each_gets_its_own_rows(server, models):
    model = models["encoder"]
    count = 24
    requests = [_feeds(model, batch=1 + i % 3, seed=100 + i) for i in range(count)]
    start = threading.Barrier(count)

    def call(feeds):
        body = {"inputs": [{"name": k, "shape": list(v.shape), "datatype": "INT64", "data": v.ravel().tolist()} for k, v in feeds.items()]}
        start.wait()
        response = httpx.post(f"http://{server}/v2/models/encoder/infer", json=body, timeout=60)
        assert response.status_code == 200, response.text
        out = response.json()["outputs"][0]
        return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])

    before = _metric(server, 'toolkit_batch_size_count{model="encoder"}')
    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(call, requests))
    for feeds, got in zip(requests, results, strict=True):
        np.testing.assert_allclose(got, model.run(feeds)["logits"], rtol=1e-4, atol=1e-5)
    runs = _metric(server, 'toolkit_batch_size_count{model="encoder"}') - before
    assert 0 < runs < count  # some requests shared a run


def _metric(address, series):
    text = httpx.get(f"http://{address}/metrics").text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(series + " "))


def test_metrics_count_requests_by_model_route_and_status(server):
    httpx.post(f"http://{server}/v2/models/mlp/infer", json=_mlp_request(shape=[1, 783]))
    text = httpx.get(f"http://{server}/metrics").text
    assert 'toolkit_requests_total{model="mlp",route="infer",status="400"}' in text
    for name in ("toolkit_request_latency_seconds_bucket", "toolkit_batch_size_bucket", "toolkit_queue_depth"):
        assert name in text


def test_generate_and_generate_stream(server, models):
    from toolkit.runtime.generate import Generator

    want = Generator(models["gpt"]).generate("Return the", max_new_tokens=12)
    response = httpx.post(f"http://{server}/v2/models/gpt/generate", json={"text_input": "Return the", "parameters": {"max_tokens": 12}})
    assert response.status_code == 200, response.text
    assert response.json() == {"model_name": "gpt", "model_version": "1", "text_output": want}
    with httpx.stream("POST", f"http://{server}/v2/models/gpt/generate_stream", json={"text_input": "Return the", "max_tokens": 12}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in stream.iter_lines() if line.startswith("data: ")]
    assert len(events) > 1 and "".join(e["text_output"] for e in events) == want
    bad = httpx.post(f"http://{server}/v2/models/gpt/generate", json={"text_input": "x", "parameters": {"temperature": -1}})
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]
    assert httpx.post(f"http://{server}/v2/models/mlp/generate", json={"text_input": "x"}).status_code == 400
    tiny = httpx.post(f"http://{server}/v2/models/gpt/generate", json={"text_input": "Return the", "max_tokens": 12, "temperature": 1e-320})
    assert tiny.status_code == 200 and tiny.json()["text_output"] == want  # the limit of sampling as temperature falls: greedy
    # the OpenAI routes on the same server, whichever backend runs the model
    completion = httpx.post(f"http://{server}/v1/completions", json={"model": "gpt", "prompt": "Return the", "max_tokens": 12, "temperature": 0})
    assert completion.status_code == 200 and completion.json()["choices"][0]["text"] == want
    with httpx.stream("POST", f"http://{server}/v1/completions",
                      json={"model": "gpt", "prompt": "Return the", "max_tokens": 12, "temperature": 0, "stream": True}) as stream:
        lines = [line[len("data: "):] for line in stream.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]" and "".join(json.loads(line)["choices"][0]["text"] for line in lines[:-1]) == want


def _run(coroutine):
    return asyncio.run(coroutine)


def test_batcher_splits_rows_back_and_keeps_other_shapes_apart():
    seen = []

    def run(feeds):
        seen.append(feeds["x"].shape)
        return {"y": feeds["x"] * 2}

    async def main():
        batcher = DynamicBatcher(run, batch_axis=True, max_batch=5, max_delay_s=0.2)
        batcher.start()
        xs = [np.full((2, 3), 1.0), np.full((1, 3), 2.0), np.full((1, 4), 3.0), np.full((2, 3), 4.0)]
        results = await asyncio.gather(*(batcher.submit({"x": x}) for x in xs[:2] + xs[2:]))
        await batcher.close()
        return xs, results

    xs, results = _run(main())
    for x, result in zip(xs, results, strict=True):
        np.testing.assert_array_equal(result["y"], x * 2)
    assert sorted(seen) == [(1, 4), (5, 3)]  # rows of one shape merged into a full batch; the other ran alone


def test_batcher_refuses_when_full_and_drops_requests_past_their_deadline():
    taken, release = threading.Event(), threading.Event()

    def run(feeds):
        taken.set()
        release.wait(10)
        return {"y": feeds["x"]}

    async def main():
        batcher = DynamicBatcher(run, batch_axis=True, max_batch=1, max_delay_s=0, max_queue=2)
        batcher.start()
        busy = asyncio.ensure_future(batcher.submit({"x": np.zeros((1, 1))}))
        assert await asyncio.get_running_loop().run_in_executor(None, taken.wait, 10)  # the worker holds it; the queue is empty
        late = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 1))}, deadline=time.monotonic()))
        waiting = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 1))}))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="queue is full"):
            await batcher.submit({"x": np.ones((1, 1))})
        release.set()
        with pytest.raises(DeadlinePassed, match="past its deadline"):
            await late
        assert (await busy)["y"].shape == (1, 1) and (await waiting)["y"].shape == (1, 1)
        await batcher.close()
        with pytest.raises(Overloaded, match="shutting down"):
            await batcher.submit({"x": np.ones((1, 1))})

    _run(main())


def test_package_writes_a_triton_repository_triton_can_parse(cli, exported, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    bundle = exported("encoder")
    result = cli("package", bundle, "--triton", tmp_path / "repo", "--max-batch", "8", "--instances", "2", "--kind", "KIND_CPU", "--max-delay-ms", "0.5")
    assert result.exit_code == 0, result.output
    config = text_format.Parse((tmp_path / "repo/encoder/config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "encoder" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
    assert [(t.name, list(t.dims)) for t in config.input] == [("input_ids", [-1]), ("attention_mask", [-1])]
    assert [(t.name, list(t.dims), t.data_type) for t in config.output] == [("logits", [2], model_config_pb2.TYPE_FP32)]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.instance_group[0].count == 2 and config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert (tmp_path / "repo/encoder/1/model.onnx").read_bytes() == (bundle / "model.fp32.onnx").read_bytes()
    again = cli("package", bundle, "--triton", tmp_path / "repo")
    assert again.exit_code == 2 and "already exists; pass --force" in again.stderr


def test_package_writes_an_encoder_decoder_as_two_models(cli, exported, tmp_path):
    bundle = exported("seq2seq")
    result = cli("package", bundle, "--triton", tmp_path / "repo")
    assert result.exit_code == 0, result.output
    for name, graph in (("seq2seq", bundle / "model.fp32.onnx"), ("seq2seq-encoder", bundle / "encoder/model.fp32.onnx")):
        assert f'name: "{name}"' in (tmp_path / "repo" / name / "config.pbtxt").read_text()
        assert (tmp_path / "repo" / name / "1/model.onnx").read_bytes() == graph.read_bytes()


@pytest.mark.slow
def test_cli_serves_and_drains_a_request_in_flight_on_sigterm(exported):
    import signal

    # --port 0 takes a free port (uvicorn prints which once it has started); a long batching delay
    # keeps the request queued while the server is told to stop.
    args = [exported("mlp"), "--port", "0", "--provider", "cpu", "--threads", "1", "--max-delay-ms", "3000"]
    with cli_server(args, r"Uvicorn running on (http://\S+)") as (server, url, log):
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{url}/v2/models/mlp/infer", json=_mlp_request(), timeout=30)
            while 'toolkit_queue_depth{model="mlp"} 1.0' not in httpx.get(f"{url}/metrics").text:
                assert not pending.done(), pending.result()  # still queued: the request is in flight when SIGTERM comes
            server.send_signal(signal.SIGTERM)
            assert pending.result().status_code == 200
        assert server.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    server.stderr_reader.join(30)  # the rest of its stderr, up to its end
    log = "".join(log)
    access = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert {"method": "POST", "path": "/v2/models/mlp/infer", "status": 200}.items() <= access[-1].items()
    assert "serving mlp (fp32 on cpu, 1 thread)" in log


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_a_ray_replica_killed_under_load_costs_at_most_503s_and_is_replaced(ray_http, models):
    import ray
    from ray import serve

    model = models["mlp"]
    feeds = _feeds(model, batch=1, seed=3)
    want = model.run(feeds)["logits"]
    body = {"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": feeds["x"].ravel().tolist()}]}
    # requests wait in the replicas for their batch to fill: some are in flight on the one killed
    with deployed(ray_http, "kill", [model.bundle.path], ServeOptions(max_batch=4, max_delay_ms=300), replicas=2) as address:
        statuses, stop = [], threading.Event()

        def client():
            while not stop.is_set():
                response = httpx.post(f"http://{address}/v2/models/mlp/infer", json=body, timeout=30)  # a hang fails here
                statuses.append(response.status_code)
                if response.status_code == 200:
                    got = np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(want.shape)
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
                else:
                    assert response.status_code == 503 and "retry" in response.json()["error"], response.text

        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA::kill#mlp#")]
        assert len(replicas) == 2, replicas
        with ThreadPoolExecutor(4) as pool:
            clients = [pool.submit(client) for _ in range(4)]
            while len(statuses) < 20:
                time.sleep(0.05)
            ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
            served = len(statuses)
            while len(statuses) < served + 40:
                assert not any(c.done() for c in clients), [c.result() for c in clients if c.done()]
                time.sleep(0.05)
            stop.set()
            for c in clients:
                c.result(timeout=60)
        assert set(statuses) <= {200, 503} and statuses[-10:].count(200) == 10, statuses
        deadline = time.monotonic() + 60  # Ray Serve starts a replacement
        while serve.status().applications["kill"].deployments["mlp"].replica_states.get("RUNNING", 0) < 2:
            assert time.monotonic() < deadline, serve.status().applications["kill"].deployments["mlp"]
            time.sleep(0.5)
        assert httpx.post(f"http://{address}/v2/models/mlp/infer", json=body, timeout=30).status_code == 200
