"""`toolkit serve` kept private: TLS and mutual TLS with certificates made here and a real TLS client,
scoped API keys (401, 403, the OpenAI routes' model in the body, reloaded on SIGHUP without dropping
requests), an access log that carries no payload, and the whole of it at once: an encrypted, signed
bundle served over mutual TLS to a key that may only infer on it, with nothing decrypted on disk."""

from __future__ import annotations

import json
import logging
import signal
import threading

import httpx
import numpy as np
import pytest

import toolkit
from tests.secrets_kit import certificates, files_written, key_pair, signing_pair
from tests.serve.cli_server import cli_server
from tests.serve.test_serve import running
from toolkit.bundle.encryption import encrypt
from toolkit.bundle.signing import sign
from toolkit.bundle.validate import LOCK_NAME
from toolkit.runtime.model import Model
from toolkit.serve.app import ServeOptions
from toolkit.serve.keys import add_key, revoke_key
from toolkit.serve.tls import TLS

CANARY = 4242.125  # an input value, and (as text) a prompt, that must never reach the log
PROMPT = "canary-prompt-7f3e"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def models(exported):
    return {name: Model(exported(name), provider="cpu") for name in ("mlp", "gpt")}


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    secrets = {name: add_key(path, name, scopes) for name, scopes in {
        "app": ["infer:mlp"], "writer": ["generate:gpt"], "ops": ["metrics"], "admin": ["admin"], "all-infer": ["infer:*"]}.items()}
    return path, secrets


def _infer_body(model, value=0.5):
    spec = model.inputs[0]
    data = np.full((1, *spec.shape[1:]), value, dtype=np.float32)
    return {"inputs": [{"name": spec.name, "shape": list(data.shape), "datatype": "FP32", "data": data.ravel().tolist()}]}


def _auth(secret):
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture(scope="module")
def keyed(models, keys_file):
    with running(list(models.values()), ServeOptions(keys=keys_file[0])) as address:
        yield f"http://{address}", keys_file[1]


@pytest.mark.parametrize(("key", "method", "path", "body", "status"), [
    (None, "GET", "/v2", None, 401),
    ("tk_not-a-key", "GET", "/v2", None, 401),
    ("app", "GET", "/v2", None, 200),
    ("app", "POST", "/v2/models/mlp/infer", "mlp", 200),
    ("app", "GET", "/v2/models/mlp", None, 200),
    ("app", "GET", "/v2/models/mlp/versions/1/config", None, 200),
    ("app", "GET", "/v2/models/gpt", None, 403),
    ("app", "POST", "/v2/models/gpt/generate", {"text_input": "x"}, 403),
    ("app", "GET", "/metrics", None, 403),
    ("app", "POST", "/v2/repository/index", {}, 403),
    ("all-infer", "POST", "/v2/models/mlp/infer", "mlp", 200),
    ("writer", "POST", "/v2/models/gpt/generate", {"text_input": "x", "parameters": {"max_tokens": 2}}, 200),
    ("writer", "POST", "/v2/models/mlp/infer", "mlp", 403),
    ("writer", "POST", "/v1/completions", {"model": "gpt", "prompt": "x", "max_tokens": 2}, 200),
    ("app", "POST", "/v1/completions", {"model": "gpt", "prompt": "x", "max_tokens": 2}, 403),
    ("ops", "GET", "/metrics", None, 200),
    ("ops", "POST", "/v2/models/mlp/infer", "mlp", 403),
    ("admin", "POST", "/v2/repository/index", {}, 200),
    (None, "GET", "/v2/health/ready", None, 200),
])
def test_each_key_may_do_what_its_scopes_say(keyed, models, key, method, path, body, status):
    url, secrets = keyed
    headers = _auth(secrets.get(key, key)) if key else {}
    payload = _infer_body(models[body]) if isinstance(body, str) else body
    response = httpx.request(method, url + path, headers=headers, json=payload, timeout=30)
    assert response.status_code == status, response.text
    if status == 403:
        error = response.json()["error"]
        message = error["message"] if isinstance(error, dict) else error  # the OpenAI routes answer in OpenAI's shape
        assert f"key {key!r} may not" in message and "its scopes:" in message


def test_a_key_lists_only_the_models_it_may_use(keyed):
    url, secrets = keyed
    listed = httpx.get(url + "/v1/models", headers=_auth(secrets["writer"])).json()["data"]
    assert [m["id"] for m in listed] == ["gpt"]


def test_keys_are_stored_hashed_and_checked_when_read(keyed, keys_file, tmp_path):
    from toolkit.errors import ToolkitError
    from toolkit.serve.keys import read_keys

    text = keys_file[0].read_text()
    assert all(secret not in text for secret in keys_file[1].values())
    bad = tmp_path / "keys.json"
    for content, message in [({"keys": [{"name": "a", "sha256": "secret", "scopes": ["infer:mlp"]}]}, "64 lowercase hex digits"),
                             ({"keys": [{"name": "a", "sha256": "0" * 64, "scopes": ["infer"]}]}, "scope 'infer' is none of"),
                             ({"keys": [{"name": "a", "sha256": "0" * 64, "scopes": []}]}, "non-empty list")]:
        bad.write_text(json.dumps(content))
        with pytest.raises(ToolkitError, match=message):
            read_keys(bad)


def test_the_access_log_carries_no_payload_unless_asked(models, caplog):
    caplog.set_level(logging.DEBUG)
    for log_payloads in (False, True):
        caplog.clear()
        with running(list(models.values()), ServeOptions(log_payloads=log_payloads)) as address:
            url = f"http://{address}"
            assert httpx.post(url + "/v2/models/mlp/infer", json=_infer_body(models["mlp"], CANARY)).status_code == 200
            assert httpx.post(url + "/v2/models/gpt/generate", json={"text_input": PROMPT, "parameters": {"max_tokens": 3}}).status_code == 200
            assert httpx.post(url + "/v2/models/mlp/infer", json={"inputs": [{"name": str(CANARY)}]}).status_code == 400
        logged = caplog.text
        access = [json.loads(r.getMessage()) for r in caplog.records if r.name == "toolkit.access"]
        assert {"model", "status", "bytes_in", "bytes_out", "ms", "id", "key"} <= set(access[0])
        assert access[0]["bytes_in"] > 0 and access[0]["bytes_out"] > 0
        if log_payloads:
            assert str(CANARY) in logged and PROMPT in logged
        else:
            assert str(CANARY) not in logged and PROMPT not in logged, logged


def _client(certs, *, cert=True, stranger=False):
    """An HTTPS client that trusts the test CA, presenting the client's certificate (or a stranger's, or none)."""
    import ssl

    context = ssl.create_default_context(cafile=str(certs["ca"]))
    if cert:
        name = "stranger" if stranger else "client"
        context.load_cert_chain(certs[name], certs[f"{name}_key"])
    return httpx.Client(verify=context, timeout=30)


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(models, certs):
    tls = TLS(certs["server"], certs["server_key"], certs["ca"])
    with running([models["mlp"]], ServeOptions(), tls=tls) as address:
        with _client(certs) as client:
            assert client.post(f"https://{address}/v2/models/mlp/infer", json=_infer_body(models["mlp"])).status_code == 200
        for client in (_client(certs, cert=False), _client(certs, stranger=True)):
            with client, pytest.raises(httpx.TransportError):
                client.get(f"https://{address}/v2/health/ready")
        with pytest.raises(httpx.TransportError):  # plain HTTP on a TLS port: no answer at all
            httpx.get(f"http://{address}/v2/health/ready", timeout=10)


def test_tls_without_a_ca_serves_any_client_that_trusts_the_server(models, certs):
    with running([models["mlp"]], ServeOptions(), tls=TLS(certs["server"], certs["server_key"])) as address:
        with _client(certs, cert=False) as client:
            assert client.get(f"https://{address}/v2/health/ready").status_code == 200
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the server's CA refuses it
            httpx.get(f"https://{address}/v2/health/ready")


def test_tls_flags_are_checked_before_the_server_starts(certs, tmp_path):
    from toolkit.errors import ToolkitError

    with pytest.raises(ToolkitError, match="give both --tls-cert and --tls-key"):
        TLS.of(certs["server"], None, None)
    with pytest.raises(ToolkitError, match="--tls-ca needs --tls-cert"):
        TLS.of(None, None, certs["ca"])
    with pytest.raises(ToolkitError, match=r"--tls-cert .* with --tls-key .*key matching"):
        TLS.of(certs["server"], certs["client_key"], None)


def test_an_encrypted_signed_bundle_served_over_mutual_tls_to_a_key_that_may_only_infer(exported, tmp_path, certs, caplog):
    """The issue's whole story in one test."""
    caplog.set_level(logging.DEBUG)
    secret, recipient = key_pair(tmp_path, "x25519")
    signing_key, public = signing_pair(tmp_path)
    sealed = encrypt(exported("mlp"), recipients=[recipient], out=tmp_path / "mlp")
    sign(sealed, signing_key)
    keys = tmp_path / "keys.json"
    app_key = add_key(keys, "app", ["infer:mlp"])
    tls = TLS(certs["server"], certs["server_key"], certs["ca"])
    plain = toolkit.load(exported("mlp"), provider="cpu")
    with files_written() as written:
        model = toolkit.load(sealed, verify=public, key=secret, provider="cpu")
        with running([model], ServeOptions(keys=keys), tls=tls) as address, _client(certs) as client:
            url = f"https://{address}/v2/models/mlp"
            answer = client.post(url + "/infer", json=_infer_body(model, CANARY), headers=_auth(app_key))
            assert answer.status_code == 200, answer.text
            assert client.get(f"https://{address}/metrics", headers=_auth(app_key)).status_code == 403
            assert client.post(url + "/infer", json=_infer_body(model)).status_code == 401
    feeds = {plain.inputs[0].name: np.full((1, *plain.inputs[0].shape[1:]), CANARY, np.float32)}
    assert np.allclose(answer.json()["outputs"][0]["data"], plain.run(feeds)[plain.outputs[0].name].ravel())
    assert [p for p in written if not p.endswith(LOCK_NAME)] == []
    assert str(CANARY) not in caplog.text


@pytest.mark.slow
def test_sighup_reloads_the_keys_without_dropping_a_request(exported, tmp_path):
    keys = tmp_path / "keys.json"
    stays, goes = add_key(keys, "stays", ["infer:mlp"]), add_key(keys, "goes", ["infer:mlp"])
    model = Model(exported("mlp"), provider="cpu")
    body = _infer_body(model)
    with cli_server([exported("mlp"), "--keys", keys, "--port", "0"], r"Uvicorn running on (http://\S+)") as (server, url, _):
        statuses, done = [], threading.Event()

        def hammer():
            with httpx.Client(timeout=30) as client:
                while not done.is_set():
                    statuses.append(client.post(url + "/v2/models/mlp/infer", json=body, headers=_auth(stays)).status_code)

        worker = threading.Thread(target=hammer)
        worker.start()
        try:
            assert httpx.post(url + "/v2/models/mlp/infer", json=body, headers=_auth(goes)).status_code == 200
            revoke_key(keys, "goes")
            for _ in range(5):
                server.send_signal(signal.SIGHUP)
            import time

            time.sleep(1.5)
            assert httpx.post(url + "/v2/models/mlp/infer", json=body, headers=_auth(goes)).status_code == 401
        finally:
            done.set()
            worker.join(30)
        assert statuses and set(statuses) == {200}


@pytest.mark.slow
def test_the_command_line_serves_https_and_warns_of_payload_logging(exported, certs):
    args = [exported("mlp"), "--port", "0", "--tls-cert", certs["server"], "--tls-key", certs["server_key"], "--log-payloads"]
    with cli_server(args, r"Uvicorn running on (https://\S+)") as (_, url, log):
        assert any("--log-payloads is on" in line for line in log)
        with _client(certs, cert=False) as client:
            assert client.get(url + "/v2/health/ready").status_code == 200
