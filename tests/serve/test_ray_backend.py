"""The Ray backend's parts that need no Ray cluster (how the ingress answers what Ray raises, the
options, the CLI's refusals), and `toolkit serve --backend ray` end to end in a subprocess. The
protocol conformance suite runs against Ray in test_serve.py."""

from __future__ import annotations

import asyncio
import re
import signal
import time

import httpx
import numpy as np
import psutil
import pytest
import ray.exceptions
from ray.serve.exceptions import BackPressureError

from tests.serve.cli_server import cli_server
from toolkit.errors import ToolkitError
from toolkit.runtime.model import Model, Signature
from toolkit.serve.app import ServeOptions, Unavailable
from toolkit.serve.batching import run_merged
from toolkit.serve.metrics import Metrics
from toolkit.serve.ray_backend import RayOptions, _Remote, application


class _Response:
    """A DeploymentResponse stand-in: awaiting it raises `error` or waits forever."""

    def __init__(self, error=None):
        self.error, self.cancelled = error, False

    def __await__(self):
        if self.error is not None:
            raise self.error
        yield from asyncio.sleep(3600).__await__()

    def cancel(self):
        self.cancelled = True


class _Handle:
    def __init__(self, response):
        self.infer = self.generate = type("Method", (), {"remote": lambda _, *args: response})()


def _remote(exported, response):
    signature = Signature(Model(exported("mlp"), provider="cpu").bundle)
    return _Remote("mlp", _Handle(response), signature, Metrics())


def _task_error(cause):
    return ray.exceptions.RayTaskError("infer", "Traceback: ...", cause).as_instanceof_cause()


@pytest.mark.parametrize(("error", "expected", "message"), [
    (ray.exceptions.ActorDiedError(), Unavailable, "the replica running this request went away (ActorDiedError); retry"),
    (ray.exceptions.ActorUnavailableError("gone", b"\0" * 16), Unavailable, "went away (ActorUnavailableError)"),
    (BackPressureError(num_queued_requests=4, max_queued_requests=4), Unavailable, "has a full queue on every replica"),
    (_task_error(ToolkitError("input 'x': axis 1 must be 784")), ToolkitError, "^input 'x': axis 1 must be 784$"),
])
def test_what_ray_raises_becomes_a_503_or_the_replicas_own_message(exported, error, expected, message):
    remote = _remote(exported, _Response(error))
    with pytest.raises(expected, match=message if message.startswith("^") else re.escape(message)) as caught:
        asyncio.run(remote.run({"x": np.zeros((1, 784), np.float32)}, None))
    assert "Traceback" not in str(caught.value)


def test_an_unexpected_replica_error_is_not_dressed_as_a_client_error(exported):
    with pytest.raises(ray.exceptions.RayTaskError):  # the protocol app answers it 500, its details in the log only
        asyncio.run(_remote(exported, _Response(_task_error(ZeroDivisionError("boom")))).run({}, None))


def test_a_request_past_its_deadline_is_cancelled_and_answered_503(exported):
    response = _Response()
    remote = _remote(exported, response)
    with pytest.raises(Unavailable, match="did not answer before the request's deadline"):
        asyncio.run(remote.run({"x": np.zeros((1, 784), np.float32)}, time.monotonic() + 0.05))
    assert response.cancelled and remote.depth == 0


def test_ray_batches_merge_like_the_native_batcher_and_a_bad_request_fails_alone():
    runs = []

    def run(feeds):
        runs.append(feeds["x"].shape)
        if (feeds["x"] < 0).any():
            raise ValueError("negative")
        return {"y": feeds["x"] * 2}

    requests = [{"x": np.full((2, 3), 1.0)}, {"x": np.full((1, 4), 2.0)}, {"x": np.full((1, 3), -1.0)}, {"x": np.full((2, 3), 3.0)}]
    answers = run_merged(run, requests, batch_axis=True, max_batch=4)
    assert isinstance(answers[2], ValueError)
    for request, answer in zip(requests[:2] + requests[3:], answers[:2] + answers[3:], strict=True):
        np.testing.assert_array_equal(answer["y"], request["x"] * 2)
    # (2,3)+(1,3) merged and failed, then each alone; the third (2,3) past max_batch ran in a batch of its own
    assert sorted(runs) == sorted([(3, 3), (2, 3), (1, 3), (2, 3), (1, 4)])


@pytest.mark.parametrize(("options", "message"), [
    ({"replicas": 0}, "replicas must be >= 1"),
    ({"num_cpus": 0}, "num-cpus-per-replica > 0"),
    ({"autoscale": (3, 1)}, "autoscale bounds must be MIN:MAX"),
    ({"autoscale": (0, 0)}, "autoscale bounds must be MIN:MAX"),
])
def test_ray_options_refuse_what_cannot_run(options, message):
    with pytest.raises(ToolkitError, match=message):
        RayOptions(**options)


def test_application_refuses_bad_bundles_before_anything_is_deployed(exported, tmp_path):
    with pytest.raises(ToolkitError, match="is not a bundle"):
        application([tmp_path])
    with pytest.raises(ToolkitError, match="has no variant 'int4'"):
        application([exported("mlp")], ray_options=RayOptions(variant="int4"))
    with pytest.raises(ToolkitError, match="two bundles are both named 'mlp'"):
        application([exported("mlp"), exported("mlp")])
    with pytest.raises(ToolkitError, match="model repository API .* is native-only"):
        application([exported("mlp")], ServeOptions(repository=(tmp_path,)))


def test_replicas_the_cluster_could_never_place_are_refused_before_anything_is_deployed(exported, monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(ToolkitError, match=r"1 bundle\(s\) × 3 replica\(s\) × 1 CPU \(--num-cpus-per-replica\) need 3 CPU; the Ray cluster has 2"):
        application([exported("mlp")], ray_options=RayOptions(replicas=3, num_cpus=1))
    with pytest.raises(ToolkitError, match=r"× 1 GPU \(--num-gpus-per-replica\) need 1 GPU; the Ray cluster has 0"):
        application([exported("mlp")], ray_options=RayOptions(num_gpus=1))
    application([exported("mlp")], ray_options=RayOptions(replicas=3))  # by default the 2 CPUs are shared among the 3


@pytest.mark.parametrize(("args", "message"), [
    (["--replicas", "2"], "--replicas is an option of the Ray backend; add --backend ray"),
    (["--backend", "ray", "--autoscale", "1-4"], "--autoscale takes MIN:MAX"),
    (["--backend", "ray", "--replicas", "2", "--autoscale", "1:4"], "give --replicas or --autoscale, not both"),
    (["--backend", "ray", "--cuda-graph"], "--cuda-graph is native-only"),
])
def test_cli_refuses_ray_flags_that_do_not_fit(cli, exported, args, message):
    result = cli("serve", exported("mlp"), *args)
    assert result.exit_code == 2 and message in result.stderr


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_cli_serves_with_ray_and_leaves_no_process_behind_on_sigterm(exported):
    args = [exported("mlp"), "--backend", "ray", "--port", "0", "--provider", "cpu", "--replicas", "2"]
    with cli_server(args, r"with Ray Serve at (http://\S+)") as (server, url, log):
        response = httpx.post(f"{url}/v2/models/mlp/infer", timeout=30, json={
            "inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": [0.5] * 784}]})
        assert response.status_code == 200, response.text
        children = psutil.Process(server.pid).children(recursive=True)
        assert any("raylet" in " ".join(c.cmdline()) for c in children)  # a local instance of its own
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
    assert "2 replica(s) each" in "".join(log)


def test_ray_refuses_mutual_tls_saying_why(cli, exported, tmp_path):
    from tests.secrets_kit import certificates

    certs = certificates(tmp_path)
    result = cli("serve", exported("mlp"), "--backend", "ray", "--tls-cert", certs["server"], "--tls-key", certs["server_key"],
                 "--tls-ca", certs["ca"])
    assert result.exit_code == 2 and "--tls-ca (mutual TLS) is native-only" in result.stderr


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_ray_serves_an_encrypted_bundle_over_tls_to_scoped_keys(exported, tmp_path):
    import ssl

    from tests.secrets_kit import certificates, key_pair
    from toolkit.bundle.encryption import encrypt
    from toolkit.serve.keys import add_key

    secret, recipient = key_pair(tmp_path, "x25519")
    sealed = encrypt(exported("mlp"), recipients=[recipient], out=tmp_path / "mlp")
    certs = certificates(tmp_path)
    keys = tmp_path / "keys.json"
    app, ops = add_key(keys, "app", ["infer:mlp"]), add_key(keys, "ops", ["metrics"])
    args = [sealed, "--backend", "ray", "--port", "0", "--provider", "cpu", "--key", secret, "--keys", keys,
            "--tls-cert", certs["server"], "--tls-key", certs["server_key"]]
    body = {"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": [0.5] * 784}]}
    with cli_server(args, r"with Ray Serve at (https://\S+)") as (server, url, _):
        with httpx.Client(verify=ssl.create_default_context(cafile=str(certs["ca"])), timeout=60) as client:
            infer = f"{url}/v2/models/mlp/infer"
            assert client.post(infer, json=body, headers={"Authorization": f"Bearer {app}"}).status_code == 200
            assert client.post(infer, json=body, headers={"Authorization": f"Bearer {ops}"}).status_code == 403
            assert client.post(infer, json=body).status_code == 401
        with pytest.raises(httpx.TransportError):
            httpx.get(url.replace("https", "http") + "/v2/health/ready", timeout=10)
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
