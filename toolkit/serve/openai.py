"""The OpenAI API on `toolkit serve`, beside the KServe v2 routes and sharing their admission,
limits, bearer token and metrics: what the `openai` client, LangChain, LlamaIndex, chat UIs and
evaluation harnesses speak.

- `GET /v1/models`, `/v1/models/{model}`: the served models.
- `POST /v1/completions`: `prompt` (text or token ids, or a list of them) continued.
- `POST /v1/chat/completions`: `messages` rendered with the model's own chat template (kept in the
  bundle at export), then continued as the assistant.
- `POST /v1/embeddings`: sentence embeddings of an encoder bundle that embeds (task `embed`) and
  carries its tokenizer.

Both generation routes take `max_tokens` (chat: also `max_completion_tokens`), `temperature`,
`top_p`, `seed`, `stop`, `n`, `stream` with `stream_options.include_usage`, and `logprobs`
(completions: the number of alternatives; chat: `logprobs` with `top_logprobs`), plus vLLM's
`top_k`. Every other parameter is refused by name (400), or accepted only at the value that means
it is off (`presence_penalty: 0`, `echo: false`, ...): nothing is silently ignored. Errors come in
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.

Parsing here is pure (bytes → a request, events → JSON); the serving (admission, the scheduler) is
the host's (`toolkit.serve.app`).
"""

from __future__ import annotations

import json
import math
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from toolkit.runtime.generate.scheduler import Event
from toolkit.serve.protocol import ProtocolError, checked_stop, checked_text

__all__ = ["CHAT_PARAMETERS", "COMPLETION_PARAMETERS", "OpenAIRequest", "chat_chunks", "completion_chunks", "decode_embeddings",
           "decode_openai", "response"]

_SHARED = ("model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream", "stream_options", "logprobs", "user")
COMPLETION_PARAMETERS = (*_SHARED, "prompt")
CHAT_PARAMETERS = (*_SHARED, "messages", "max_completion_tokens", "top_logprobs")
# Accepted only at the value that leaves them off: anything else would need what toolkit does not do.
_OFF: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "repetition_penalty": (1, 1.0), "logit_bias": ({},), "echo": (False,),
    "suffix": ("",), "best_of": (1,), "tools": ([],), "tool_choice": ("none",), "parallel_tool_calls": (False, True),
    "response_format": ({"type": "text"},), "store": (False,), "min_p": (0, 0.0),
}
# [low, high] of each number (OpenAI's ranges; top_k is vLLM's, -1 meaning off as there)
_RANGES = {"max_tokens": (1, 2**31 - 1), "max_completion_tokens": (1, 2**31 - 1), "temperature": (0.0, 2.0), "top_p": (0.0, 1.0),
           "top_k": (-1, 2**31 - 1), "seed": (0, 2**63 - 1), "n": (1, 16), "logprobs": (0, 20), "top_logprobs": (0, 20)}
_ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class OpenAIRequest:
    """A completions or chat completions request, checked; `logprobs`: how many alternatives to
    report per token (None: no log-probabilities)."""

    chat: bool
    model: str
    prompts: tuple[str | tuple[int, ...], ...]  # text or token ids
    messages: tuple[dict[str, str], ...]
    max_tokens: int | None
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: tuple[str, ...]
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None


def decode_openai(body: bytes, *, chat: bool) -> OpenAIRequest:
    """Parses a /v1/completions (`chat` False) or /v1/chat/completions body; a ProtocolError names
    the parameter at fault."""
    request = _object(body)
    known = CHAT_PARAMETERS if chat else COMPLETION_PARAMETERS
    given = {k: v for k, v in request.items() if v is not None}  # null is "not given", as OpenAI reads it
    for name, value in given.items():
        if name in known:
            continue
        if name in _OFF:
            if any(value == off and type(value) is type(off) for off in _OFF[name]):
                continue
            allowed = " or ".join(json.dumps(v) for v in _OFF[name])
            raise ProtocolError(f"{name!r} is not supported by this server (only {allowed}, which leaves it off).", param=name)
        raise ProtocolError(f"unknown or unsupported parameter {name!r}; this route takes {', '.join(known)}.", param=name)
    model = given.get("model")
    if not isinstance(model, str) or not model:
        raise ProtocolError("'model' must name a served model (GET /v1/models lists them).", param="model")
    stream = _flag(given, "stream")
    options = given.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise ProtocolError("'stream_options' takes only include_usage.", param="stream_options")
    if options and not stream:
        raise ProtocolError("'stream_options' applies only with stream: true.", param="stream_options")
    if chat:
        prompts, messages = (), _messages(given.get("messages"))
        if "max_tokens" in given and "max_completion_tokens" in given:
            raise ProtocolError("give max_completion_tokens or max_tokens, not both.", param="max_tokens")
        max_tokens = _number(given, "max_completion_tokens", int) or _number(given, "max_tokens", int)
        logprobs = _flag(given, "logprobs")
        top = _number(given, "top_logprobs", int)
        if top is not None and not logprobs:
            raise ProtocolError("'top_logprobs' needs logprobs: true.", param="top_logprobs")
        logprobs = (top or 0) if logprobs else None
    else:
        prompts, messages = _prompts(given.get("prompt")), ()
        max_tokens = _number(given, "max_tokens", int) or 16  # OpenAI's default for completions
        logprobs = _number(given, "logprobs", int)
    top_k = _number(given, "top_k", int)
    temperature = _number(given, "temperature", float)
    return OpenAIRequest(chat=chat, model=model, prompts=prompts, messages=messages, max_tokens=max_tokens,
                         temperature=1.0 if temperature is None else temperature, top_p=_number(given, "top_p", float),
                         top_k=None if top_k in (None, -1, 0) else top_k, seed=_number(given, "seed", int), stop=checked_stop(given.get("stop")),
                         n=_number(given, "n", int) or 1, stream=stream, include_usage=bool(options and options.get("include_usage")),
                         logprobs=logprobs)


def decode_embeddings(body: bytes) -> tuple[str, list[str], str]:
    """(model, the texts, encoding format: float or base64) of a /v1/embeddings body."""
    request = {k: v for k, v in _object(body).items() if v is not None}
    for name in request:
        if name not in ("model", "input", "encoding_format", "user"):
            raise ProtocolError(f"unknown or unsupported parameter {name!r}; /v1/embeddings takes model, input, encoding_format, user.",
                                param=name)
    model = request.get("model")
    if not isinstance(model, str) or not model:
        raise ProtocolError("'model' must name a served model (GET /v1/models lists them).", param="model")
    texts = request.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise ProtocolError("'input' must be a non-empty string or a list of them (token arrays are not taken).", param="input")
    encoding = request.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise ProtocolError(f"'encoding_format' must be float or base64, got {str(encoding)[:40]!r}.", param="encoding_format")
    return model, texts, encoding


def _object(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"the body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(request, dict):
        raise ProtocolError("the body must be a JSON object.")
    return request


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _flag(given: Mapping[str, Any], name: str) -> bool:
    value = given.get(name, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"{name!r} must be true or false, got {_short(value)}.", param=name)
    return value


def _number(given: Mapping[str, Any], name: str, kind: type) -> Any:
    value = given.get(name)
    if value is None:
        return None
    integral = isinstance(value, int) or isinstance(value, float) and value.is_integer()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not integral) or not math.isfinite(value):
        raise ProtocolError(f"{name!r} must be {'an integer' if kind is int else 'a number'}, got {_short(value)}.", param=name)
    low, high = _RANGES[name]
    if not low <= value <= high:
        raise ProtocolError(f"{name!r} must lie in [{low}, {high}], got {_short(value)}.", param=name)
    return kind(value)


def _prompts(prompt: Any) -> tuple[str | tuple[int, ...], ...]:
    """A prompt, or several: text, or token ids (a list of integers; several: a list of them)."""
    def ids(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)

    prompts = [prompt] if isinstance(prompt, str) or ids(prompt) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) or ids(p) for p in prompts):
        raise ProtocolError("'prompt' must be a string, a non-empty list of token ids, or a non-empty list of either.", param="prompt")
    if len(prompts) > _RANGES["n"][1]:
        raise ProtocolError(f"'prompt' has {len(prompts)} prompts; this server takes at most {_RANGES['n'][1]} per request.", param="prompt")
    return tuple(p if isinstance(p, str) else tuple(p) for p in prompts)


def _messages(messages: Any) -> tuple[dict[str, str], ...]:
    """The conversation as the template reads it: role and text content (text parts joined)."""
    if not isinstance(messages, list) or not messages:
        raise ProtocolError("'messages' must be a non-empty list of {role, content} objects.", param="messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ProtocolError(f"{where} must be an object with a 'role'.", param="messages")
        if message["role"] not in _ROLES:
            raise ProtocolError(f"{where}.role {message['role'][:40]!r} is not supported; roles: {', '.join(_ROLES)} (no tools).",
                                param="messages")
        if unknown := sorted(set(message) - {"role", "content", "name"}):
            raise ProtocolError(f"{where}.{unknown[0]} is not supported (no tool calls).", param="messages")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ProtocolError(f"{where}.content: only text parts are supported, got {str(kind)[:40]!r}.", param="messages")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise ProtocolError(f"{where}.content must be a string or a list of text parts.", param="messages")
        out.append({"role": "system" if message["role"] == "developer" else message["role"], "content": content,
                    **({"name": message["name"]} if isinstance(message.get("name"), str) else {})})
    return tuple(out)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- answers --------------------------------------------------------------------------------------


class Answer:
    """One request's answer in the making: its id, and each choice's text and log-probabilities
    as events arrive (`tokenizer` names each token for logprobs)."""

    def __init__(self, request: OpenAIRequest, tokenizer: Any, eos: Sequence[int]):
        self.request, self.tokenizer, self.eos = request, tokenizer, set(eos)
        self.id = ("chatcmpl-" if request.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if request.chat else "text_completion"

    def logprobs(self, events: Sequence[Event], offset: int = 0) -> dict[str, Any] | None:
        """The choice's logprobs field for `events` (the end-of-text token not among them);
        `offset`: where the first event's text starts in the choice's text (completions)."""
        if self.request.logprobs is None:
            return None
        events = [e for e in events if e.token is not None and e.token not in self.eos]
        name = lambda t: self.tokenizer.decode([t])  # noqa: E731
        if self.request.chat:
            def item(token: int, logprob: float) -> dict[str, Any]:
                return {"token": name(token), "logprob": logprob, "bytes": list(self.tokenizer.token_bytes(token))}

            return {"content": [item(e.token, e.logprob) | {"top_logprobs": [item(t, p) for t, p in e.top]} for e in events]}
        offsets, at = [], offset
        for e in events:
            offsets.append(at)
            at += len(name(e.token))
        return {"tokens": [name(e.token) for e in events], "token_logprobs": [e.logprob for e in events],
                "top_logprobs": [{name(t): p for t, p in e.top} for e in events], "text_offset": offsets}

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}

    def head(self) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.request.model}


def response(answer: Answer, choices: Sequence[Sequence[Event]], prompt_tokens: int) -> dict[str, Any]:
    """The whole answer (not streamed) from every choice's events."""
    out = []
    for index, events in enumerate(choices):
        text = "".join(e.text for e in events)
        choice: dict[str, Any] = {"index": index, "logprobs": answer.logprobs(events), "finish_reason": events[-1].finish_reason}
        choice |= {"message": {"role": "assistant", "content": text}} if answer.request.chat else {"text": text}
        out.append(choice)
    return answer.head() | {"choices": out, "usage": answer.usage(prompt_tokens, sum(len(e) for e in choices))}


def chat_chunks(answer: Answer, index: int, event: Event | None) -> list[dict[str, Any]]:
    """The stream's chunks for one event of choice `index` (None: the choice's opening chunk, its role):
    one per token, as OpenAI and llama.cpp send them, its text empty where it is held back (it may
    begin a stop string) or not yet a whole character."""
    head = answer.head() | {"object": "chat.completion.chunk"}
    usage = {"usage": None} if answer.request.include_usage else {}
    if event is None:
        return [head | {"choices": [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]} | usage]
    return [head | {"choices": [{"index": index, "delta": {"content": event.text} if event.text else {},
                                 "logprobs": answer.logprobs([event]), "finish_reason": event.finish_reason}]} | usage]


def completion_chunks(answer: Answer, index: int, event: Event, offset: int) -> list[dict[str, Any]]:
    usage = {"usage": None} if answer.request.include_usage else {}
    return [answer.head() | {"choices": [{"index": index, "text": event.text, "logprobs": answer.logprobs([event], offset),
                                          "finish_reason": event.finish_reason}]} | usage]


# --- routes ---------------------------------------------------------------------------------------


class OpenAIRoutes:
    """The /v1 routes over a host (toolkit.serve.app's routes): its served models, admission,
    limits, scheduler submission and metrics."""

    def __init__(self, host: Any):
        self.host = host
        self.created = int(time.time())
        # an embedder's tokenizer, read (and decrypted, for a sealed bundle) once per served model
        self._tokenizers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    def _embedding_feeds(self, signature: Any, texts: Sequence[str]) -> tuple[dict[str, Any], int]:
        from toolkit.runtime.tokenizer import HF_TOKENIZER_FILE, HFTokenizer

        if signature not in self._tokenizers:
            self._tokenizers[signature] = HFTokenizer(signature.bundle.asset(HF_TOKENIZER_FILE), ())
        return _embedding_feeds(signature, self._tokenizers[signature], texts)

    def routes(self) -> list[Any]:
        from starlette.routing import Route

        return [Route("/v1/models", self.models), Route("/v1/models/{model:path}", self.model),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"])]

    def _card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "toolkit"}

    async def models(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        grants = request.scope.get("state", {}).get("grants")  # a scoped key sees the models it may use
        names = [name for name in self.host.served if grants is None or grants.allows("see", name)]
        return JSONResponse({"object": "list", "data": [self._card(name) for name in names]})

    async def model(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse(self._card(self.host.named(request.path_params["model"], request, "see").name))

    async def completions(self, request: Any) -> Any:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Any) -> Any:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Any, *, chat: bool) -> Any:
        import contextlib

        from starlette.responses import JSONResponse, Response, StreamingResponse

        from toolkit.serve.generation import ClientGone, Unavailable, collect

        host, arrived = self.host, time.perf_counter()
        held = contextlib.AsyncExitStack()
        admitted = await held.enter_async_context(host.admission.request(generation=True))
        try:
            parsed = decode_openai(await host.body_of(request, admitted, json_body=True), chat=chat)
            s = host.named(parsed.model, request, "generate")
            if not s.generates:
                raise ProtocolError(f"model {s.name!r} does not generate text (it is not a decoder with a KV cache)"
                                    + ("; it embeds: POST /v1/embeddings" if _embeds(s) else "."), param="model")
            host.ready_for(s)
            prompter = host.prompter(s)
            if chat:
                texts = [await host.off_loop(_render, prompter, parsed.messages)]
            else:
                texts = list(parsed.prompts)
            prompts = await host.encode(s, texts, "messages" if chat else "prompt")
            requests = [_engine_request(parsed, prompt, prompter.room(len(prompt)), choice, host.generation_deadline())
                        for prompt in prompts for choice in range(parsed.n)]
            streams = await host.start(s, requests, arrived)
        except BaseException:
            await held.aclose()
            raise
        answer = Answer(parsed, prompter.tokenizer, prompter.eos_ids)
        prompt_tokens = sum(len(p) for p in prompts)
        if parsed.stream:
            return StreamingResponse(_sse(answer, streams, prompt_tokens, held, request), media_type="text/event-stream")
        async with held:
            try:
                choices = await collect(_merged(streams), request)
            except ClientGone:
                return Response(status_code=499)
            except Unavailable as exc:
                raise ProtocolError(str(exc), 503) from None
        ordered = [[e for i, e in choices if i == index] for index in range(len(streams))]
        return JSONResponse(response(answer, ordered, prompt_tokens))

    async def embeddings(self, request: Any) -> Any:
        import base64

        import numpy as np
        from starlette.responses import JSONResponse

        host = self.host
        async with host.admission.request() as admitted:
            name, texts, encoding = decode_embeddings(await host.body_of(request, admitted, json_body=True))
            s = host.named(name, request, "infer")
            if not _embeds(s):
                raise ProtocolError(f"model {s.name!r} does not embed: /v1/embeddings takes an encoder bundle of task 'embed' that "
                                    "carries its tokenizer (toolkit export hf:PATH of a sentence-transformers model).", param="model")
            host.ready_for(s)
            for text in texts:
                checked_text(text, "input", host.options.max_prompt_bytes)
            feeds, tokens = await host.off_loop(self._embedding_feeds, s.signature, texts)
            vectors = (await host.run_batched(s, feeds))[s.signature.outputs[0].name].astype(np.float32)

        def item(i: int, vector: Any) -> dict[str, Any]:
            value = base64.b64encode(vector.astype("<f4").tobytes()).decode() if encoding == "base64" else vector.tolist()
            return {"object": "embedding", "index": i, "embedding": value}

        return JSONResponse({"object": "list", "model": s.name, "data": [item(i, v) for i, v in enumerate(vectors)],
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _render(prompter: Any, messages: Sequence[dict[str, str]]) -> str:
    from toolkit.errors import ToolkitError

    try:
        return prompter.chat(messages)
    except ToolkitError as exc:
        raise ProtocolError(str(exc), param="messages") from None


def _engine_request(parsed: OpenAIRequest, prompt: list[int], room: int, choice: int, deadline: float) -> Any:
    """The scheduler's request for one choice of one prompt (choice i of a seeded request draws
    from seed + i, so that n choices differ and each is reproducible)."""
    from toolkit.errors import ToolkitError
    from toolkit.runtime.generate import Sampling
    from toolkit.runtime.generate.scheduler import Request

    if room < 1:
        raise ProtocolError(f"the prompt is {len(prompt)} tokens, the whole of the model's context; nothing can follow it.",
                            param="messages" if parsed.chat else "prompt")
    greedy = parsed.temperature == 0  # top_p and top_k do not change the most likely token
    try:
        sampling = Sampling(temperature=parsed.temperature, top_p=None if greedy or parsed.top_p in (None, 1.0) else parsed.top_p,
                            top_k=None if greedy else parsed.top_k, seed=None if parsed.seed is None else (parsed.seed + choice) % 2**63)
    except ToolkitError as exc:
        raise ProtocolError(str(exc), param="top_p" if "top_p" in str(exc) else "temperature") from None
    limit = parsed.max_tokens if parsed.max_tokens is not None else room  # chat without a limit: what the context leaves
    return Request(prompt, max_new_tokens=limit, sampling=sampling, stop=parsed.stop, logprobs=parsed.logprobs, deadline=deadline)


async def _merged(streams: Sequence[Any]) -> Any:
    """(choice index, event) from every choice's events, as they come."""
    import asyncio

    done, queue = object(), asyncio.Queue()

    async def pump(index: int, events: Any) -> None:
        try:
            async for event in events:
                await queue.put((index, event))
        except BaseException as exc:
            await queue.put((index, exc))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.ensure_future(pump(i, events)) for i, events in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            index, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task, events in zip(tasks, streams, strict=True):
            task.cancel()
            await events.aclose()  # returns at once: cancelling needs no await, even in a cancelled task


async def _sse(answer: Answer, streams: Sequence[Any], prompt_tokens: int, held: Any, request: Any) -> Any:
    """The answer as server-sent events: a chunk per token of each choice, the usage last where
    asked, then `data: [DONE]`. A failure after the stream began ends it with an error event."""
    from toolkit.serve.generation import Unavailable

    def line(data: Any) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    completion_tokens, offsets = 0, [0] * len(streams)
    try:
        if answer.request.chat:
            for index in range(len(streams)):
                for chunk in chat_chunks(answer, index, None):
                    yield line(chunk)
        async for index, event in _merged(streams):
            completion_tokens += 1
            chunks = chat_chunks(answer, index, event) if answer.request.chat else completion_chunks(answer, index, event, offsets[index])
            offsets[index] += len(event.text)
            for chunk in chunks:
                yield line(chunk)
        if answer.request.include_usage:
            yield line(answer.head() | {"object": "chat.completion.chunk" if answer.request.chat else "text_completion", "choices": [],
                                        "usage": answer.usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"
    except Exception as exc:  # the stream has begun: its end says what went wrong, in OpenAI's shape
        status = 503 if isinstance(exc, Unavailable) else 500
        message = str(exc) if status == 503 else "internal error; the server's log has the details."
        if status == 500:
            import logging

            logging.getLogger("toolkit.serve").error("a generation failed mid-stream", exc_info=exc)
        yield line({"error": {"message": message, "type": "server_error", "param": None, "code": status}})
    finally:
        await held.aclose()


def _embeds(s: Any) -> bool:
    from toolkit.runtime.tokenizer import HF_TOKENIZER_FILE

    manifest = s.signature.bundle.manifest
    return manifest.task == "embed" and HF_TOKENIZER_FILE in (manifest.assets or {}) and "input_ids" in {t.name for t in s.signature.inputs}


def _embedding_feeds(signature: Any, tokenizer: Any, texts: Sequence[str]) -> tuple[dict[str, Any], int]:
    """The encoder's inputs for `texts` (tokenized as the model was, padded to the longest, cut to
    the model's longest sequence) and the tokens they hold."""
    import numpy as np

    bundle = signature.bundle
    longest = next((d.max for d in bundle.manifest.dims if d.name == "seq"), None) or 512
    ids = [tokenizer.encode(text, special_tokens=True)[:longest] for text in texts]
    width = max(map(len, ids))
    feeds = {"input_ids": np.array([row + [0] * (width - len(row)) for row in ids], dtype=np.int64),
             "attention_mask": np.array([[1] * len(row) + [0] * (width - len(row)) for row in ids], dtype=np.int64)}
    if "token_type_ids" in {t.name for t in signature.inputs}:
        feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    return signature.validate(feeds), sum(map(len, ids))
