"""`toolkit serve` under hostile and faulty traffic: a bad request co-batched with good ones fails
alone, a dead batching loop answers 503 and restarts, health probes answer while a large body is
decoded, unknown models cannot grow the metrics, admission refuses past its limits, internals never
reach the client, outputs JSON cannot carry are refused clearly, and models load and unload through
Triton's repository API; and the holes an attacker's review found, each reproduced first."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from toolkit.runtime.model import Model
from toolkit.serve.app import ServeOptions
from toolkit.serve.batching import DynamicBatcher

from .test_serve import TOKEN, running


@pytest.fixture(scope="module")
def mlp(exported):
    return Model(exported("mlp"), provider="cpu")


def _binary(name: str, value: np.ndarray, *, binary_output: bool) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": name, "shape": list(value.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": value.nbytes}}],
                         "parameters": {"binary_data_output": binary_output}}).encode()
    return header + value.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def test_a_failing_request_co_batched_with_good_ones_fails_alone():
    runs = []

    def run(feeds):
        runs.append(len(feeds["x"]))
        if np.isnan(feeds["x"]).any():
            raise ValueError("a NaN row")
        return {"y": feeds["x"] * 2}

    async def main():
        batcher = DynamicBatcher(run, batch_axis=True, max_batch=8, max_delay_s=0.2)
        batcher.start()
        good = [np.full((1, 2), float(i)) for i in range(3)]
        results = await asyncio.gather(*(batcher.submit({"x": x}) for x in [good[0], np.full((1, 2), np.nan), *good[1:]]),
                                       return_exceptions=True)
        await batcher.close()
        return good, results

    good, results = asyncio.run(main())
    assert isinstance(results[1], ValueError)
    for x, result in zip(good, [results[0], *results[2:]], strict=True):
        np.testing.assert_array_equal(result["y"], x * 2)
    assert runs == [4, 1, 1, 1, 1]  # the merged batch failed, then each member ran alone


def test_a_dead_batching_loop_answers_503_turns_unready_and_restarts(mlp, monkeypatch):
    gather = DynamicBatcher._gather
    failures = []

    async def dies_once(self):
        if not failures:
            failures.append(1)
            raise RuntimeError("the loop's own bug")
        return await gather(self)

    body, headers = _binary("x", np.zeros((1, 784), np.float32), binary_output=False)
    with running([mlp], ServeOptions()) as address:
        monkeypatch.setattr(DynamicBatcher, "_gather", dies_once)
        failed = httpx.post(f"http://{address}/v2/models/mlp/infer", content=body, headers=headers)
        assert failed.status_code == 503 and "batching loop failed" in failed.json()["error"]
        assert httpx.get(f"http://{address}/v2/health/ready").status_code == 503
        assert httpx.get(f"http://{address}/v2/models/mlp/ready").json()["ready"] is False
        deadline = time.monotonic() + 10
        while httpx.get(f"http://{address}/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "the loop did not restart"
            time.sleep(0.05)
        assert httpx.post(f"http://{address}/v2/models/mlp/infer", content=body, headers=headers).status_code == 200


def test_liveness_answers_quickly_while_a_large_json_body_is_decoded(mlp):
    rows = 3000
    body = json.dumps({"inputs": [{"name": "x", "shape": [rows, 784], "datatype": "FP32",
                                   "data": np.round(np.random.default_rng(0).random(rows * 784), 6).tolist()}]}).encode()
    assert len(body) > 16 << 20
    with running([mlp], ServeOptions()) as address:
        done = {}
        poster = threading.Thread(target=lambda: done.setdefault("response", httpx.post(
            f"http://{address}/v2/models/mlp/infer", content=body, headers={"content-type": "application/json"}, timeout=120)))
        latencies = []
        with httpx.Client() as client:
            client.get(f"http://{address}/v2/health/live")  # the connection is open before the timing starts
            poster.start()
            while poster.is_alive():
                start = time.perf_counter()
                assert client.get(f"http://{address}/v2/health/live").status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.01)
        poster.join()
    assert done["response"].status_code == 200, done["response"].text[:300]
    assert len(latencies) > 10 and max(latencies) < 0.1, sorted(latencies)[-5:]


def test_requests_to_unknown_models_do_not_grow_the_metrics(mlp):
    with running([mlp], ServeOptions()) as address, httpx.Client() as client:
        def series() -> set[str]:
            text = client.get(f"http://{address}/metrics").text
            return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}

        client.post(f"http://{address}/v2/models/probe/infer", content=b"{}")
        before = series()
        for i in range(1000):
            assert client.post(f"http://{address}/v2/models/m{i}/infer", content=b"{}").status_code == 404
        after = series()
    assert after == before and any('model="_unknown"' in s for s in after)


def test_triton_counters_are_exposed_under_tritons_names(mlp):
    body, headers = _binary("x", np.zeros((2, 784), np.float32), binary_output=True)
    with running([mlp], ServeOptions()) as address:
        for _ in range(3):
            assert httpx.post(f"http://{address}/v2/models/mlp/infer", content=body, headers=headers).status_code == 200
        httpx.post(f"http://{address}/v2/models/mlp/infer", content=b"{}")
        text = httpx.get(f"http://{address}/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith("nv_")}
    key = '{model="mlp",version="1"}'
    assert values["nv_inference_request_success" + key] == 3 and values["nv_inference_request_failure" + key] == 1
    assert values["nv_inference_count" + key] == 6 and 1 <= values["nv_inference_exec_count" + key] <= 3
    for name in ("request_duration_us", "queue_duration_us", "compute_infer_duration_us"):
        assert values[f"nv_inference_{name}{key}"] > 0
    assert "# TYPE nv_inference_request_success counter" in text


def test_an_internal_error_says_only_its_request_id(mlp, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret detail of the server")

    body, headers = _binary("x", np.zeros((1, 784), np.float32), binary_output=False)
    with running([mlp], ServeOptions()) as address:
        monkeypatch.setattr(Model, "validate", broken)
        response = httpx.post(f"http://{address}/v2/models/mlp/infer", content=body, headers=headers)
    assert response.status_code == 500 and "secret" not in response.text and "RuntimeError" not in response.text
    assert response.json()["request_id"] == response.headers["x-request-id"] and "request id" in response.json()["error"]


def test_an_output_json_cannot_carry_is_refused_saying_how_to_get_it(mlp):
    body, headers = _binary("x", np.full((1, 784), np.nan, np.float32), binary_output=False)
    with running([mlp], ServeOptions()) as address:
        response = httpx.post(f"http://{address}/v2/models/mlp/infer", content=body, headers=headers)
        assert response.status_code == 422 and "holds NaN or Infinity, which JSON cannot carry" in response.json()["error"]
        binary, headers = _binary("x", np.full((1, 784), np.nan, np.float32), binary_output=True)
        assert httpx.post(f"http://{address}/v2/models/mlp/infer", content=binary, headers=headers).status_code == 200


def test_admission_refuses_past_the_requests_in_flight():
    """One request holds the only slot while its body trickles in; the next is refused at once."""
    from toolkit.serve.app import _Admission

    rejected = []

    async def main():
        admission = _Admission(max_requests=1, max_bytes=100, on_reject=rejected.append)
        async with admission.request() as held:
            held.reserve(60)
            with pytest.raises(Exception, match="1 requests in flight, its limit"):
                async with admission.request():
                    pass
        async with admission.request() as first:
            first.reserve(500)  # alone, a request larger than the budget is admitted
        assert admission.requests == 0 and admission.bytes == 0

    asyncio.run(main())
    assert rejected == ["requests"]


def test_a_slow_sender_holds_its_slot_and_the_next_request_gets_503(mlp):
    body, headers = _binary("x", np.zeros((1, 784), np.float32), binary_output=False)
    with running([mlp], ServeOptions(max_in_flight=1)) as address:
        host, port = address.split(":")
        slow = socket.create_connection((host, int(port)))
        head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": address, "Content-Length": len(body), **headers}.items())
        slow.sendall(f"POST /v2/models/mlp/infer HTTP/1.1\r\n{head}\r\n".encode() + body[:100])
        time.sleep(0.3)
        refused = httpx.post(f"http://{address}/v2/models/mlp/infer", content=body, headers=headers)
        assert refused.status_code == 503 and "in flight" in refused.json()["error"]
        slow.sendall(body[100:])
        assert b" 200 " in slow.recv(100)
        slow.close()
        assert httpx.get(f"http://{address}/v2/health/live").elapsed.total_seconds() < 1


def test_models_load_and_unload_through_the_repository_api(exported, tmp_path):
    from toolkit.runtime.model import load

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(exported("mlp"), repo / "mlp")
    body, headers = _binary("x", np.zeros((1, 784), np.float32), binary_output=False)
    options = ServeOptions(repository=(repo,), token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with running([], options, loader=lambda path: load(path, provider="cpu")) as address:
        url = f"http://{address}/v2/repository"
        assert httpx.post(f"{url}/index").status_code == 401  # behind the token
        assert httpx.post(f"{url}/index", headers=auth).json() == [{"name": "mlp", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}]
        assert httpx.post(f"http://{address}/v2/models/mlp/infer", content=body, headers=headers | auth).status_code == 404
        assert httpx.post(f"{url}/models/mlp/load", headers=auth).status_code == 200
        assert httpx.post(f"{url}/index", headers=auth).json() == [{"name": "mlp", "version": "1", "state": "READY"}]
        assert httpx.post(f"http://{address}/v2/models/mlp/infer", content=body, headers=headers | auth).status_code == 200
        assert httpx.post(f"{url}/models/mlp/unload", headers=auth).status_code == 200
        assert httpx.post(f"http://{address}/v2/models/mlp/infer", content=body, headers=headers | auth).status_code == 404
        missing = httpx.post(f"{url}/models/resnet/load", headers=auth)
        assert missing.status_code == 404 and "no bundle named 'resnet' in the model repository" in missing.json()["error"]


def test_a_request_with_more_rows_than_a_batch_runs_alone():
    async def main():
        batcher = DynamicBatcher(lambda feeds: {"y": feeds["x"] + 1}, batch_axis=True, max_batch=2, max_delay_s=0.05)
        batcher.start()
        result = await asyncio.wait_for(batcher.submit({"x": np.zeros((5, 1))}), 10)
        await batcher.close()
        return result

    assert asyncio.run(main())["y"].shape == (5, 1)


# --- the holes of the security review, each reproduced first ---------------------------------------------


def _json_body(value: float, rows: int) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": [rows, 784], "datatype": "FP32", "data": [value] * (rows * 784)}]}).encode()


def test_a_decode_cancelled_mid_exchange_leaves_the_next_request_a_clean_pipe(mlp):
    """A client that goes away while its large body is decoded in the child process: the exchange
    finishes before the next one starts, which gets its own answer (it got the cancelled one's, or
    hung, in 1 of 6 runs before)."""
    from toolkit.serve.decoder_process import DecoderProcess

    specs = (mlp.inputs, mlp.outputs, 1 << 30)
    big, small = _json_body(1.0, 1500), _json_body(2.0, 1)

    async def main():
        decoder = DecoderProcess()
        try:
            for delay in (0.0, 0.005, 0.02, 0.05, 0.1, 0.2):
                task = asyncio.create_task(decoder.decode(big, None, *specs))
                await asyncio.sleep(delay)
                task.cancel()
                got = await asyncio.wait_for(decoder.decode(small, None, *specs), 30)
                assert got.inputs["x"].shape == (1, 784) and float(got.inputs["x"][0, 0]) == 2.0
        finally:
            decoder.close()

    asyncio.run(main())


def test_a_module_planted_in_the_working_directory_never_runs_in_the_decoder_process(mlp, tmp_path, monkeypatch):
    from toolkit.serve.decoder_process import DecoderProcess

    marker = tmp_path / "planted-ran"
    for module in ("struct", "pickle", "json", "numpy"):
        (tmp_path / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write({module!r})\nraise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)

    async def main():
        decoder = DecoderProcess()
        try:
            return await decoder.decode(_json_body(0.5, 1), None, mlp.inputs, mlp.outputs, 1 << 30)
        finally:
            decoder.close()

    assert asyncio.run(main()).inputs["x"].shape == (1, 784)
    assert not marker.exists(), marker.read_text()


@pytest.mark.parametrize("shape", [[9223372036854775807, 0], [2**40, 2**40, 0], [0, 2**62, 2**62]])
def test_an_empty_tensor_of_impossible_size_is_a_400(mlp, shape):
    from toolkit.serve.protocol import ProtocolError, decode_request

    with pytest.raises(ProtocolError) as refused:
        decode_request(json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": []}]}).encode(),
                       None, mlp.inputs, mlp.outputs)
    assert refused.value.status == 400 and "input 'x': shape" in str(refused.value)
    with running([mlp], ServeOptions()) as address:
        response = httpx.post(f"http://{address}/v2/models/mlp/infer",
                              json={"inputs": [{"name": "x", "shape": [shape[0], 0], "datatype": "FP32", "data": []}]})
        assert response.status_code == 400, response.text


def _held_in_the_batcher(address, body, headers):
    """Sends a request that the batcher holds (its delay is long), once it is queued."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    pending = pool.submit(httpx.post, f"http://{address}/v2/models/mlp/infer", content=body, headers=headers, timeout=30)
    while 'toolkit_queue_depth{model="mlp"} 1.0' not in httpx.get(f"http://{address}/metrics").text:
        assert not pending.done(), pending.result()
    return pending


@pytest.mark.slow  # each case waits out a batching delay
@pytest.mark.parametrize("declared", [False, True], ids=["json", "json-with-header-length"])
def test_a_json_body_is_reserved_at_what_decoding_it_holds(mlp, declared):
    """Pure JSON sent with `Inference-Header-Content-Length: len(body)` was reserved at 1x its size."""
    body = _json_body(0.0, 8)
    headers = {"Inference-Header-Content-Length": str(len(body))} if declared else {}
    binary, binary_headers = _binary("x", np.zeros((1, 784), np.float32), binary_output=True)
    options = ServeOptions(max_in_flight_bytes=len(binary) + 4 * len(body), max_delay_ms=1500)
    with running([mlp], options) as address:
        held = _held_in_the_batcher(address, binary, binary_headers)
        refused = httpx.post(f"http://{address}/v2/models/mlp/infer", content=body, headers=headers)
        assert refused.status_code == 503 and "past the server's limit" in refused.json()["error"]
        assert held.result().status_code == 200
        assert httpx.post(f"http://{address}/v2/models/mlp/infer", content=body, headers=headers).status_code == 200  # alone, it fits


def test_outputs_that_overflow_are_the_clients_422_not_a_server_failure(mlp):
    with running([mlp], ServeOptions()) as address:
        response = httpx.post(f"http://{address}/v2/models/mlp/infer", content=_json_body(3e38, 1))
        assert response.status_code == 422 and "JSON cannot carry" in response.json()["error"]
        metrics = httpx.get(f"http://{address}/metrics").text
        assert 'toolkit_requests_total{model="mlp",route="infer",status="422"} 1.0' in metrics


def test_a_body_that_takes_too_long_is_a_408_and_frees_its_admission(mlp):
    body, headers = _binary("x", np.zeros((1, 784), np.float32), binary_output=False)
    with running([mlp], ServeOptions(max_in_flight=1, body_timeout_s=0.5)) as address:
        host, port = address.split(":")
        slow = socket.create_connection((host, int(port)))
        head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": address, "Content-Length": len(body), **headers}.items())
        slow.sendall(f"POST /v2/models/mlp/infer HTTP/1.1\r\n{head}\r\n".encode() + body[:100])
        slow.settimeout(10)
        assert b" 408 " in slow.recv(200)
        slow.close()
        assert httpx.post(f"http://{address}/v2/models/mlp/infer", content=body, headers=headers).status_code == 200


def test_two_concurrent_loads_of_one_model_load_it_once(exported, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from toolkit.runtime.model import load

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(exported("mlp"), repo / "mlp")
    loads = []

    def loader(path):
        loads.append(path)
        time.sleep(0.5)
        return load(path, provider="cpu")

    with running([], ServeOptions(repository=(repo,)), loader=loader) as address:
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: httpx.post(f"http://{address}/v2/repository/models/mlp/load", timeout=30), range(2)))
        assert [a.status_code for a in answers] == [200, 200] and len(loads) == 1
