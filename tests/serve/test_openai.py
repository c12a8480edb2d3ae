"""The OpenAI API on `toolkit serve`, tried with the official `openai` client as a real client uses
it, and with hostile requests: completions and chat completions (streamed and not) give the tokens
the Generator gives alone, concurrent clients share decode steps, and every limit answers a clear 4xx
or 503 in OpenAI's error shape."""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from toolkit import Generator, Sampling
from toolkit.runtime.model import Model
from toolkit.serve.app import ServeOptions

from .test_serve import TOKEN, running

openai = pytest.importorskip("openai", reason="the OpenAI routes are tested with the official client (pip install -e '.[test]')")
pytest.importorskip("transformers", reason="the chat model is a Hugging Face LLaMA (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def llama(with_variants):
    """A LLaMA-style decoder with a chat template (ChatML), fused: it decodes over cache slots written in place."""
    from models.hf_causal import causal_lm

    return Model(with_variants(f"hf:{causal_lm('llama')}", ("opt",), preset=None), variant="opt", provider="cpu")


@pytest.fixture(scope="module")
def embedder(exported):
    from models.hf_heads import hf_model

    return Model(exported(f"hf:{hf_model('bert-embed')}", None), provider="cpu")


@pytest.fixture(scope="module")
def server(exported, llama, embedder):
    gpt = Model(exported("gpt"), provider="cpu")
    with running([gpt, llama, embedder], ServeOptions(token=TOKEN, slots=4)) as address:
        yield address


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"http://{server}/v1", api_key=TOKEN, max_retries=0)


def test_models_lists_every_served_model(client, llama, embedder):
    assert [m.id for m in client.models.list()] == ["gpt", llama.name, embedder.name]
    assert client.models.retrieve("gpt").owned_by == "toolkit"


def test_a_completion_is_the_generators_text(client, exported):
    want = Generator(exported("gpt"), provider="cpu").generate("Return the", max_new_tokens=24)
    got = client.completions.create(model="gpt", prompt="Return the", max_tokens=24, temperature=0)
    assert got.choices[0].text == want and got.choices[0].finish_reason in ("length", "stop")
    assert got.usage.prompt_tokens == len("Return the") and got.usage.completion_tokens <= 24
    ids = client.completions.create(model="gpt", prompt=[list(b"Return the"), "Return the"], max_tokens=24, temperature=0)
    assert [c.text for c in ids.choices] == [want, want] and ids.usage.prompt_tokens == 2 * len("Return the")
    stopped = client.completions.create(model="gpt", prompt="Return the", max_tokens=24, temperature=0, stop=[want[4:7]])
    assert stopped.choices[0].text == want[: want.index(want[4:7])] and stopped.choices[0].finish_reason == "stop"


def test_a_chat_streams_with_the_models_template_and_usage(client, llama):
    from toolkit.runtime.chat import render_chat

    generator = Generator(llama, cache="growing")
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Return the value of"}]
    manifest = llama.bundle.manifest.generation
    prompt = render_chat(manifest["chat_template"], messages, special_tokens=manifest["chat_tokens"])
    assert prompt.endswith("<|im_start|>assistant\n")
    want = generator.generate(prompt, max_new_tokens=20)
    chunks = list(client.chat.completions.create(model=llama.name, messages=messages, max_tokens=20, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(generator.encode(prompt))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (["length"], ["stop"])
    whole = client.chat.completions.create(model=llama.name, messages=messages, max_tokens=20, temperature=0)
    assert whole.choices[0].message.content == want and whole.choices[0].message.role == "assistant"


def test_n_seeded_choices_and_logprobs(client, llama):
    messages = [{"role": "user", "content": "If the"}]
    first = client.chat.completions.create(model=llama.name, messages=messages, max_tokens=8, temperature=0.9, seed=5, n=2,
                                           logprobs=True, top_logprobs=3)
    again = client.chat.completions.create(model=llama.name, messages=messages, max_tokens=8, temperature=0.9, seed=5, n=2)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]  # reproducible per choice
    assert first.choices[0].message.content != first.choices[1].message.content  # each choice its own seed
    content = first.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    assert bytes(b for t in content for b in t.bytes).decode("utf-8", "replace") == first.choices[0].message.content
    greedy = client.completions.create(model="gpt", prompt="Return the", max_tokens=6, temperature=0, logprobs=2)
    logprobs = greedy.choices[0].logprobs
    assert [max(top, key=top.get) for top in logprobs.top_logprobs] == logprobs.tokens  # greedy: the most likely one
    assert "".join(logprobs.tokens) == greedy.choices[0].text and logprobs.text_offset[0] == 0


def test_concurrent_clients_share_decode_steps_and_each_gets_its_own_tokens(client, server, exported):
    generator = Generator(exported("gpt"), provider="cpu", cache="growing")
    prompts = ["Return the", "If the", "Raise ValueError", "The", "Create a new", "A list of"]
    want = [generator.generate(p, max_new_tokens=40) for p in prompts]

    def ask(prompt):
        return client.completions.create(model="gpt", prompt=prompt, max_tokens=40, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(ask, prompts)) == want
    metrics = httpx.get(f"http://{server}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    tokens = float(re.search(r'^vllm:generation_tokens_total\{model_name="gpt"\} (\S+)', metrics, re.M).group(1))
    assert tokens >= sum(len(w) for w in want)
    assert re.search(r'^vllm:time_to_first_token_seconds_count\{model_name="gpt"\} [1-9]', metrics, re.M)
    assert re.search(r'^vllm:inter_token_latency_seconds_count\{model_name="gpt"\} [1-9]', metrics, re.M)
    assert 'vllm:kv_cache_usage_perc{model_name="gpt"}' in metrics and 'vllm:num_requests_waiting{model_name="gpt"}' in metrics


def test_embeddings_are_the_models_sentence_embeddings(client, embedder):
    import base64

    import numpy as np

    from toolkit.runtime.tokenizer import HF_TOKENIZER_FILE, HFTokenizer

    got = client.embeddings.create(model=embedder.name, input=["Return the value of", "If the"])
    tokenizer = HFTokenizer(embedder.bundle.asset_path(HF_TOKENIZER_FILE), ())
    ids = tokenizer.encode("Return the value of", special_tokens=True)
    want = embedder(input_ids=np.array([ids]), attention_mask=np.ones((1, len(ids)), np.int64))[0]
    np.testing.assert_allclose(got.data[0].embedding, want, rtol=1e-5, atol=1e-6)
    assert len(got.data) == 2 and got.usage.prompt_tokens > len(ids)
    encoded = client.embeddings.create(model=embedder.name, input="If the", encoding_format="base64")  # given, it is not decoded
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(encoded.data[0].embedding), "<f4"), got.data[1].embedding, rtol=1e-6)


@pytest.mark.parametrize(("body", "status", "param", "message"), [
    ({"model": "gpt", "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty", "not supported by this server"),
    ({"model": "gpt", "prompt": "x", "functions": []}, 400, "functions", "unknown or unsupported parameter 'functions'"),
    ({"model": "nope", "prompt": "x"}, 404, "model", "unknown model 'nope'"),
    ({"model": "gpt", "prompt": "x", "temperature": 3}, 400, "temperature", "must lie in [0.0, 2.0]"),
    ({"model": "gpt", "prompt": "x", "max_tokens": 10**6}, 400, None, "beyond the model's context"),
    ({"model": "gpt", "prompt": "ab\ud800"}, 400, "prompt", "lone surrogate"),
    ({"model": "gpt", "prompt": "x", "stop": ["s"] * 1000}, 400, "stop", "at most 16"),
    ({"model": "gpt", "prompt": "x", "stop": ["s" * 5000]}, 400, "stop", "at most 256"),
    ({"model": "gpt", "prompt": "x" * (2 << 20)}, 413, "prompt", "this server's limit for a prompt"),
    ({"model": "gpt", "prompt": [[1, 2], "x", []]}, 400, "prompt", "a non-empty list of token ids"),
    ({"model": "gpt", "prompt": [1, 2, 300]}, 400, None, "token ids must lie in [0, 257)"),
    ({"model": "gpt", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "only with stream"),
    ({"model": "gpt", "prompt": "", "max_tokens": 2}, 400, "prompt", "empty"),
], ids=["penalty", "functions", "unknown-model", "temperature", "max-tokens", "surrogate", "many-stops", "long-stop", "huge-prompt",
        "empty-token-array", "token-past-vocabulary", "stream-options", "empty"])
def test_bad_completions_get_openais_error_shape(server, body, status, param, message):
    response = httpx.post(f"http://{server}/v1/completions", content=json.dumps(body), headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param and error["type"] in ("invalid_request_error", "not_found_error")


def test_chat_errors_and_a_model_without_a_template(client, llama, embedder):
    with pytest.raises(openai.BadRequestError, match="has no chat template"):
        client.chat.completions.create(model="gpt", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="roles: system, developer, user, assistant"):
        client.chat.completions.create(model=llama.name, messages=[{"role": "tool", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="only text parts"):
        client.chat.completions.create(model=llama.name, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    with pytest.raises(openai.BadRequestError, match="does not generate text"):
        client.chat.completions.create(model=embedder.name, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()
    assert caught.value.body["type"] == "authentication_error"


def test_a_tiny_temperature_samples_the_most_likely_token(client, exported):
    want = Generator(exported("gpt"), provider="cpu").generate("Return the", max_new_tokens=8)
    got = client.completions.create(model="gpt", prompt="Return the", max_tokens=8, temperature=1e-320)
    assert got.choices[0].text == want
    assert Sampling(temperature=1e-320, seed=0).chooser()(__import__("numpy").array([[0.0, 1.0, 0.5]])).tolist() == [1]


def test_a_client_that_disconnects_frees_its_slot(server, monkeypatch, caplog):
    from toolkit.runtime.generate.slots import PaddedSlots

    decode = PaddedSlots.decode
    monkeypatch.setattr(PaddedSlots, "decode", lambda self, tokens: time.sleep(0.01) or decode(self, tokens))  # a generation lasts

    def running() -> float:
        metrics = httpx.get(f"http://{server}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
        return float(re.search(r'^vllm:num_requests_running\{model_name="gpt"\} (\S+)', metrics, re.M).group(1))

    body = {"model": "gpt", "prompt": "Return the", "max_tokens": 110, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"http://{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {TOKEN}"}) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        assert running() == 1
    deadline = time.monotonic() + 5
    while running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert running() == 0 and "failed" not in caplog.text
    # not streamed: the answer is sent whole, and the generation stops when the client goes
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"http://{server}/v1/completions", json=body | {"stream": False}, headers={"Authorization": f"Bearer {TOKEN}"},
                   timeout=0.05)
    deadline = time.monotonic() + 5
    while running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert running() == 0 and "failed" not in caplog.text


def test_a_generation_waits_for_a_slot_no_longer_than_its_deadline_and_infer_still_answers(exported, monkeypatch):
    from toolkit.runtime.generate.slots import PaddedSlots

    decode = PaddedSlots.decode
    monkeypatch.setattr(PaddedSlots, "decode", lambda self, tokens: time.sleep(0.4) or decode(self, tokens))  # a step of 0.4 s
    gpt, mlp = Model(exported("gpt"), provider="cpu"), Model(exported("mlp"), provider="cpu")
    with running([gpt, mlp], ServeOptions(slots=1, timeout_ms=1000, max_in_flight=4)) as address:
        url = f"http://{address}/v1/completions"
        first = {}
        holder = threading.Thread(target=lambda: first.setdefault("r", httpx.post(url, json={"model": "gpt", "prompt": "a", "max_tokens": 8},
                                                                                     timeout=60)))
        holder.start()  # holds the model's only slot for about 3 s
        time.sleep(0.3)
        late = httpx.post(url, json={"model": "gpt", "prompt": "b", "max_tokens": 2}, timeout=30)
        # 503, not the 200 it would get once the first ends: its deadline passed while it waited
        assert late.status_code == 503 and "waited past its deadline" in late.json()["error"]["message"], late.text
        # generations may hold half of --max-in-flight: a third is refused at once, infer still gets in
        second = threading.Thread(target=lambda: httpx.post(url, json={"model": "gpt", "prompt": "c", "max_tokens": 2}, timeout=60))
        second.start()
        time.sleep(0.1)
        refused = httpx.post(url, json={"model": "gpt", "prompt": "d", "max_tokens": 2}, timeout=30)
        assert refused.status_code == 503 and "generations in flight" in refused.json()["error"]["message"]
        infer = httpx.post(f"http://{address}/v2/models/mlp/infer",
                           json={"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": [0.0] * 784}]})
        assert infer.status_code == 200
        holder.join(60)
        second.join(60)
        assert first["r"].status_code == 200
