"""Text generation with a decoder bundle's KV-cache graph: `toolkit.Generator(model)`.

The graph (see `ModelSpec.generation`) takes input_ids, attention_mask, position_ids and
past_key_i/past_value_i, and returns logits and present_key_i/present_value_i. The first step
feeds the whole (left-padded) prompt batch with an empty cache; every later step feeds one token per
row and the cache the previous step returned. An encoder-decoder's prompts are its source: its
encoder part runs once on them, and every decoder step reads the encoder's output (`memory_*`) and
`source_mask`. Sampling happens here, in numpy, so the ONNX graphs and the PyTorch reference
(`Generator.reference`) run the exact same loop.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.runtime import Model
from toolkit.spec import TensorSpec
from toolkit.tokenizer import tokenizer_for

__all__ = ["Generator", "Sampling", "greedy_tokens", "token_agreement"]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when temperature is 0, else sampled from the
    temperature-scaled distribution, cut to the top_k tokens and/or the top_p probability mass."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ToolkitError(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature}.")
        if self.top_k is not None and self.top_k < 1:
            raise ToolkitError(f"top_k must be at least 1, got {self.top_k}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ToolkitError(f"top_p must lie in (0, 1], got {self.top_p}.")
        if self.temperature == 0 and (self.top_k is not None or self.top_p is not None):
            raise ToolkitError("top_k and top_p apply to sampling; set a temperature above 0 to sample (0 is greedy).")

    def chooser(self) -> Callable[[np.ndarray], np.ndarray]:
        """logits (B, vocab) → next token per row (B,)."""
        if self.temperature == 0:
            return lambda logits: logits.argmax(-1)
        rng = np.random.default_rng(self.seed)

        def choose(logits: np.ndarray) -> np.ndarray:
            scaled = logits.astype(np.float64) / self.temperature
            if self.top_k is not None and self.top_k < scaled.shape[-1]:
                kth = np.partition(scaled, -self.top_k, axis=-1)[:, -self.top_k, None]
                scaled = np.where(scaled < kth, -np.inf, scaled)
            probs = np.exp(scaled - scaled.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            if self.top_p is not None:
                order = np.argsort(-probs, axis=-1)
                sorted_probs = np.take_along_axis(probs, order, -1)
                # Keep the smallest prefix whose mass reaches top_p (the most likely token always).
                drop_sorted = np.cumsum(sorted_probs, -1) - sorted_probs >= self.top_p
                drop = np.zeros_like(drop_sorted)
                np.put_along_axis(drop, order, drop_sorted, -1)
                probs = np.where(drop, 0.0, probs)
                probs /= probs.sum(-1, keepdims=True)
            return np.array([rng.choice(len(p), p=p) for p in probs])

        return choose


@dataclass(frozen=True)
class _Layout:
    """What the loop needs to know about the graph, read from the manifest."""

    heads: int
    head_size: int
    past_dtype: str
    eos_token_id: int
    context: int
    logits: str
    vocab: int
    caches: tuple[str, ...]  # every past_* input; its present_* output feeds it on the next step
    inputs: frozenset[str]
    encoder: str | None  # an encoder-decoder's encoder part: prompts are its source (source_ids, source_mask)
    source_context: int | None

    @classmethod
    def of(cls, name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], generation: Mapping[str, Any] | None) -> _Layout:
        names = {t.name for t in inputs}
        past = [t for t in inputs if t.name.startswith("past_key_")]
        needed = {"input_ids", "attention_mask", "position_ids"}
        if not generation or not past or not needed <= names:
            raise ToolkitError(
                f"{name} is not a decoder with a KV cache: generation needs a graph taking input_ids, attention_mask, "
                f"position_ids and past_key_i/past_value_i (its inputs: {', '.join(sorted(names))}). "
                "The reference gpt and seq2seq (`toolkit export gpt`) are."
            )
        _, heads, _, head_size = past[0].shape
        vocab = next(t.high for t in inputs if t.name == "input_ids")
        caches = tuple(t.name for t in inputs if t.name.startswith("past_"))
        return cls(heads, head_size, past[0].dtype, generation["eos_token_id"], generation["context"], outputs[0].name, vocab,
                   caches, frozenset(names), generation.get("encoder"), generation.get("source_context"))


class Generator:
    """Generates text from a decoder bundle: `Generator(path_or_model).generate("Return the")`."""

    def __init__(self, model: Model | str | os.PathLike[str], *, variant: str | None = None, provider: str = "auto",
                 threads: int | None = None):
        if not isinstance(model, Model):
            model = Model(model, variant=variant, provider=provider, threads=threads)
        manifest = model.bundle.manifest
        self.model = model
        self.layout = _Layout.of(model.name, model.inputs, model.outputs, manifest.generation)
        self.tokenizer = tokenizer_for(manifest.generation)
        self._step = _step(model, {"present_" + name.removeprefix("past_") for name in self.layout.caches})
        self._encoder_step = None
        if self.layout.encoder:
            encoder = Model(model.bundle.path / self.layout.encoder, variant=model.variant, provider=model.provider, threads=threads)
            self._encoder_step = _step(encoder, {o.name for o in encoder.outputs})

    @classmethod
    def reference(cls, path: str | os.PathLike[str], spec: Any = None, device: str = "cpu") -> Generator:
        """The same loop over the bundle's PyTorch reference (eager, on torch `device`), for parity and
        benchmarks; `spec` (its `ModelSpec`) saves rebuilding it when the caller has it already."""
        from toolkit.source import resolve

        generator = cls(Model(path, provider="cpu"))
        spec = spec if spec is not None else resolve(generator.model.bundle.manifest.source)
        generator._step = _torch_step(spec, device)
        if generator.layout.encoder:
            generator._encoder_step = _torch_step(spec.parts[generator.layout.encoder], device)
        return generator

    def generate(self, prompt: str | Sequence[str], *, max_new_tokens: int = 64, stop: Sequence[str] = (),
                 sampling: Sampling | None = None) -> str | list[str]:
        """The continuation of each prompt (without the prompt), cut before the first stop string or
        the end-of-text token. A list of prompts runs as one left-padded batch."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        streams = [_TextStream(self.tokenizer, stop) for _ in prompts]
        for tokens in self.tokens([self._encode(p, i, len(prompts)) for i, p in enumerate(prompts)],
                                  max_new_tokens=max_new_tokens, sampling=sampling,
                                  done=lambda: [s.finished for s in streams]):
            for s, token in zip(streams, tokens, strict=True):
                s.push(int(token))
        texts = [s.text() for s in streams]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str, *, max_new_tokens: int = 64, stop: Sequence[str] = (),
               sampling: Sampling | None = None) -> Iterator[str]:
        """Yields the continuation of one prompt piece by piece, as tokens arrive; the pieces join to
        what `generate` returns (text that may begin a stop string is held back until it cannot).
        Bad arguments raise here, before the first piece."""
        text = _TextStream(self.tokenizer, stop)
        steps = self.tokens([self._encode(prompt, 0, 1)], max_new_tokens=max_new_tokens, sampling=sampling,
                            done=lambda: [text.finished])

        def pieces() -> Iterator[str]:
            for (token,) in steps:
                piece = text.push(int(token))
                if piece:
                    yield piece
            rest = text.close()
            if rest:
                yield rest

        return pieces()

    def tokens(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64, sampling: Sampling | None = None,
               done: Callable[[], Sequence[bool]] | None = None) -> Iterator[np.ndarray]:
        """The token-level loop: yields each step's new token per row (B,). Rows that produced the
        end-of-text token keep going (their later tokens mean nothing); the loop ends after
        `max_new_tokens` steps, or once `done()` says every row is finished."""
        self._validate(prompts, max_new_tokens)
        return self._loop(prompts, max_new_tokens, (sampling or Sampling()).chooser(), done)

    def _validate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        layout = self.layout
        if not prompts:
            raise ToolkitError("no prompt given.")
        if max_new_tokens < 1:
            raise ToolkitError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        for i, ids in enumerate(prompts):
            if not len(ids):
                raise ToolkitError(f"prompt {i + 1} of {len(prompts)} has no tokens; give at least one.")
            if min(ids) < 0 or max(ids) >= layout.vocab:
                raise ToolkitError(f"prompt {i + 1} of {len(prompts)}: token ids must lie in [0, {layout.vocab}), got {min(ids)}..{max(ids)}.")
        longest = max(len(p) for p in prompts)
        if layout.source_context is not None:
            if longest > layout.source_context:
                raise ToolkitError(f"the longest prompt is {longest} tokens, beyond the model's source context of "
                                   f"{layout.source_context} tokens. Shorten it.")
            if 1 + max_new_tokens > layout.context:
                raise ToolkitError(f"max_new_tokens {max_new_tokens} is beyond what the model's decoder holds "
                                   f"({layout.context - 1} tokens after its start token); lower it.")
        elif longest + max_new_tokens > layout.context:
            raise ToolkitError(
                f"the longest prompt is {longest} tokens; with max_new_tokens {max_new_tokens} that is "
                f"{longest + max_new_tokens}, beyond the model's context of {layout.context} tokens. "
                "Shorten the prompt or lower max_new_tokens."
            )

    def _loop(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, choose: Callable[[np.ndarray], np.ndarray],
              done: Callable[[], Sequence[bool]] | None) -> Iterator[np.ndarray]:
        layout = self.layout
        batch = len(prompts)
        feeds = self._first_feeds(prompts)
        finished = np.zeros(batch, dtype=bool)
        for _ in range(max_new_tokens):
            outputs = self._step(feeds)
            token = choose(outputs[layout.logits][:, -1])
            yield token
            finished |= token == layout.eos_token_id
            if finished.all() or (done is not None and all(done())):
                return
            feeds = {
                **feeds,  # an encoder-decoder's source_mask and memory stay
                "input_ids": token[:, None].astype(np.int64),
                "attention_mask": np.concatenate([feeds["attention_mask"], np.ones((batch, 1), dtype=np.int64)], axis=1),
                "position_ids": feeds["position_ids"][:, -1:] + 1,
                **{name: outputs["present_" + name.removeprefix("past_")] for name in layout.caches},
            }

    def _first_feeds(self, prompts: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """Decoder prompts left-padded; an encoder-decoder's prompts are its right-padded source, which
        its encoder reads once, and its decoder starts from the end-of-text token."""
        layout, batch = self.layout, len(prompts)
        empty = np.zeros((batch, layout.heads, 0, layout.head_size), dtype=layout.past_dtype)
        feeds = {name: empty for name in layout.caches}
        if self._encoder_step is not None:
            longest = max(len(p) for p in prompts)
            source = {"source_ids": np.array([list(p) + [layout.eos_token_id] * (longest - len(p)) for p in prompts], dtype=np.int64),
                      "source_mask": np.array([[1] * len(p) + [0] * (longest - len(p)) for p in prompts], dtype=np.int64)}
            feeds.update({name: value for name, value in (source | self._encoder_step(source)).items() if name in layout.inputs})
            prompts = [[layout.eos_token_id]] * batch
        longest = max(len(p) for p in prompts)
        mask = np.array([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
        feeds["input_ids"] = np.array([[layout.eos_token_id] * (longest - len(p)) + list(p) for p in prompts], dtype=np.int64)
        feeds["attention_mask"] = mask
        feeds["position_ids"] = np.maximum(mask.cumsum(-1) - 1, 0)
        return feeds

    def _encode(self, prompt: Any, index: int, count: int) -> list[int]:
        where = f"prompt {index + 1} of {count}" if count > 1 else "the prompt"
        if not isinstance(prompt, str):
            raise ToolkitError(f"{where} must be text, got {type(prompt).__name__}.")
        if not prompt:
            raise ToolkitError(f"{where} is empty; give at least one character to continue.")
        return self.tokenizer.encode(prompt)


def _step(model: Model, carried: set[str]) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """The loop's step over `model`: on CUDA, the outputs `carried` to the next step (the cache, the
    encoder's memory) stay on the GPU; elsewhere, numpy in and out (the loop builds every feed to
    the spec itself, so no validation)."""
    return bound_step(model, carried) if model.provider == "cuda" else model.run_validated


def bound_step(model: Model, kept: set[str]) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """`model`'s step through IO binding: outputs named in `kept` stay where the session computed
    them (on the GPU for a CUDA session), as OrtValues that later steps take as inputs without a
    round trip through the host; the other outputs come back as numpy arrays."""
    import onnxruntime as ort

    session, names = model.session, [o.name for o in model.outputs]
    device = "cuda" if model.provider == "cuda" else "cpu"

    def step(feeds: Mapping[str, Any]) -> dict[str, Any]:
        binding = session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in names:
            binding.bind_output(name, device if name in kept else "cpu")
        session.run_with_iobinding(binding)
        return {n: v if n in kept else v.numpy() for n, v in zip(names, binding.get_outputs(), strict=True)}

    return step


def _torch_step(spec: Any, device: str) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """A graph's step run by its PyTorch reference module on torch `device`, numpy in and out."""
    from toolkit.source import run_reference

    spec.module.to(device)
    return functools.partial(run_reference, spec, device=device)


def greedy_tokens(generator: Generator, prompts: Sequence[Sequence[int]], new_tokens: int) -> np.ndarray:
    """(rows, steps) greedy continuation of `prompts`, run as one left-padded batch."""
    return np.stack(list(generator.tokens(prompts, max_new_tokens=new_tokens)), axis=1)


def token_agreement(got: np.ndarray, want: np.ndarray) -> dict[str, Any]:
    """Share of greedy tokens equal to the reference's, counted up to each row's first divergence
    (after one, the two continue from different text)."""
    width = min(got.shape[1], want.shape[1])  # a loop stops early only once every row has ended
    same = np.cumprod(got[:, :width] == want[:, :width], axis=1)
    return {"prompts": int(got.shape[0]), "new_tokens": int(width), "token_agreement": float(same.mean()),
            "identical_rows": int(same.all(axis=1).sum())}


class _TextStream:
    """One row's text as tokens arrive: decoded incrementally, finished by end-of-text or a stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]):
        self.eos = tokenizer.eos_id
        self.decoder = tokenizer.stream_decoder()
        self.stop = [s for s in stop if s]
        self.buffer = ""
        self.sent = 0
        self.finished = False

    def push(self, token: int) -> str:
        """Adds a token; returns the text that is now safe to show."""
        if self.finished:
            return ""
        if token == self.eos:
            return self.close()
        self.buffer += self.decoder.push(token)
        hits = [i for i in (self.buffer.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.buffer, self.finished = self.buffer[: min(hits)], True
            return self._release(len(self.buffer))
        return self._release(len(self.buffer) - self._held_back())

    def close(self) -> str:
        if not self.finished:
            self.finished = True
            self.buffer += self.decoder.flush()
        return self._release(len(self.buffer))

    def text(self) -> str:
        return self.buffer

    def _held_back(self) -> int:
        """Length of the longest end of the buffer that begins some stop string."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(self.buffer)), 0, -1)
                    if self.buffer.endswith(s[:n])), default=0)

    def _release(self, upto: int) -> str:
        piece = self.buffer[self.sent : upto]
        self.sent = max(self.sent, upto)
        return piece

