"""Text generation with a decoder bundle's KV-cache graph: `toolkit.Generator(model)`.

The graph (see `ModelSpec.generation`) takes input_ids, attention_mask, position_ids and
past_key_i/past_value_i, and returns logits and present_key_i/present_value_i. The first step
feeds the whole (left-padded) prompt batch with an empty cache; every later step feeds one token per
row and the cache the previous step returned. An encoder-decoder's prompts are its source: its
encoder part runs once on them, and every decoder step reads the encoder's output (`memory_*`) and
`source_mask`; a speech model's prompts are arrays of the features its encoder reads
(`input_features`, (mels, frames): Whisper's log-mel spectrogram). Sampling happens here, in numpy, so the ONNX graphs and the PyTorch reference
(`toolkit.reference.run.reference_generator`) run the exact same loop.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.runtime.model import Model
from toolkit.runtime.session import ort_message
from toolkit.runtime.tokenizer import tokenizer_for
from toolkit.spec import TensorSpec

__all__ = ["CACHES", "Generator", "Sampling", "greedy_tokens", "token_agreement"]

CACHES = ("auto", "growing", "inplace", "static")


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
    eos_token_id: int  # pads left-padded prompts too
    eos_ids: tuple[int, ...]  # every token that ends a row
    context: int
    logits: str
    vocab: int
    caches: tuple[str, ...]  # every past_* input; its present_* output feeds it on the next step
    inputs: frozenset[str]
    encoder: str | None  # an encoder-decoder's encoder part: prompts are its source (source_ids, source_mask)
    source_context: int | None
    decoder_start: tuple[int, ...]  # an encoder-decoder's decoder starts every row from these
    features: bool  # an encoder-decoder whose prompts are feature arrays (speech), not text
    rules: _Rules

    @property
    def positions(self) -> bool:
        """Whether the graph takes position_ids (an encoder-decoder's counts positions from its cache)."""
        return "position_ids" in self.inputs

    @classmethod
    def of(cls, name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], generation: Mapping[str, Any] | None) -> _Layout:
        names = {t.name for t in inputs}
        past = [t for t in inputs if t.name.startswith("past_key_")]
        needed = {"input_ids", "attention_mask"} | (set() if generation and generation.get("encoder") else {"position_ids"})
        if not generation or not past or not needed <= names:
            raise ToolkitError(
                f"{name} is not a decoder with a KV cache: generation needs a graph taking input_ids, attention_mask, "
                f"position_ids and past_key_i/past_value_i (its inputs: {', '.join(sorted(names))}). "
                "The reference gpt and seq2seq (`toolkit export gpt`) are, and Hugging Face causal LMs (`toolkit export hf:PATH`)."
            )
        _, heads, _, head_size = past[0].shape
        vocab = next(t.high for t in inputs if t.name == "input_ids")
        caches = tuple(t.name for t in inputs if t.name.startswith("past_"))
        eos_ids = tuple(generation.get("eos_token_ids") or [generation["eos_token_id"]])
        return cls(heads, head_size, past[0].dtype, generation["eos_token_id"], eos_ids, generation["context"], outputs[0].name, vocab,
                   caches, frozenset(names), generation.get("encoder"), generation.get("source_context"),
                   tuple(generation.get("decoder_start") or [generation["eos_token_id"]]), generation.get("source") == "features",
                   _Rules.of(generation))


@dataclass(frozen=True)
class _Rules:
    """The token rules of a Hugging Face model's generation config, applied to the logits before a
    token is chosen, as transformers' `generate()` does: a token forced first (BART's
    forced_bos_token_id) or last (forced_eos_token_id, at max_new_tokens), tokens never chosen
    (suppress_tokens) or not first (begin_suppress_tokens)."""

    forced_first: int | None = None
    forced_last: int | None = None
    suppress: tuple[int, ...] = ()
    suppress_first: tuple[int, ...] = ()

    @classmethod
    def of(cls, generation: Mapping[str, Any]) -> _Rules:
        forced_last = generation.get("forced_eos_token_id")
        return cls(generation.get("forced_bos_token_id"), forced_last[0] if isinstance(forced_last, list) else forced_last,
                   tuple(generation.get("suppress_tokens") or ()), tuple(generation.get("begin_suppress_tokens") or ()))

    def apply(self, logits: np.ndarray, step: int, last: bool) -> np.ndarray:
        forced = self.forced_first if step == 0 else None
        forced = self.forced_last if last and self.forced_last is not None else forced
        banned = self.suppress + (self.suppress_first if step == 0 else ())
        if forced is None and not banned:
            return logits
        logits = logits.copy()
        if forced is not None:
            logits[:, :forced] = -np.inf
            logits[:, forced + 1 :] = -np.inf
        if banned:
            logits[:, list(banned)] = -np.inf
        return logits


class Generator:
    """Generates text from a decoder bundle: `Generator(path_or_model).generate("Return the")`."""

    def __init__(self, model: Model | str | os.PathLike[str], *, variant: str | None = None, provider: str = "auto",
                 threads: int | None = None, cache: str = "auto", cuda_graph: bool = True):
        """`cache`: "growing" feeds each step the cache the last one returned (the bundle's own graph);
        "inplace" (CPU) writes each step into one cache allocated per call, through the graph made
        for it (toolkit.runtime.inplace); "static" decodes over a cache preallocated to the context
        (the bundle's part `static`), on CUDA replaying captured CUDA graphs unless `cuda_graph` is
        False. "auto": on CUDA, static with CUDA graphs where the bundle has that part; on the CPU,
        inplace where the variant's graph allows it and this Generator opened the bundle itself
        (it then releases the bundle graph's session: `model.run` is not available); growing
        otherwise, and `note` says why."""
        if cache not in CACHES:
            raise ToolkitError(f"unknown cache {cache!r}; choose {', '.join(CACHES)}.")
        owned = not isinstance(model, Model)
        if owned:
            model = Model(model, variant=variant, provider=provider, threads=threads)
        manifest = model.bundle.manifest
        self.model = model
        self.layout = _Layout.of(model.name, model.inputs, model.outputs, manifest.generation)
        self.tokenizer = tokenizer_for(manifest.generation, model.bundle)
        # an encoder-decoder's source is tokenized as in training (BART's <s> ... </s>, T5's ... </s>)
        self._source_special_tokens = bool(manifest.generation.get("source_special_tokens"))
        self._step = _step(model, {"present_" + name.removeprefix("past_") for name in self.layout.caches})
        self._encoder_step = None
        if self.layout.encoder:
            encoder = Model(model.bundle.path / self.layout.encoder, variant=model.variant, provider=model.provider, threads=threads)
            self._encoder_step = _step(encoder, {o.name for o in encoder.outputs})
            self.source = encoder.inputs[0]  # what a prompt is: source_ids, or a speech model's input_features
        self.decode, self.note, self._static, self._inplace = self._choose_cache(cache, threads, cuda_graph, owned)

    def _choose_cache(self, cache: str, threads: int | None, cuda_graph: bool, owned: bool) -> tuple[str, str, _StaticSessions | None, Any]:
        """(how steps decode: "growing", "inplace", "static" or "cuda-graph"; why, when "auto" took
        neither the in-place cache nor CUDA graphs; the static-cache sessions; the in-place session)."""
        provider = self.model.provider
        if cache == "inplace" or (cache == "auto" and provider == "cpu" and owned):
            from toolkit.runtime.inplace import inplace_session

            if provider != "cpu":
                session, why = None, f"it is for the CPU provider (this model runs on {provider}; use cache 'static' there)"
            elif self.layout.encoder:
                session, why = None, "an encoder-decoder's decoder reads its encoder's memory, which the rewrite does not cover"
            else:
                if threads is None and self.model.session is not None:  # as many as the bundle graph's session has
                    threads = self.model.session.get_session_options().intra_op_num_threads or None
                session, why = inplace_session(self.model.bundle.variant_path(self.model.variant), threads)
            if session is not None:
                if owned:
                    self.model.close()  # the rewritten graph runs every step: one session's weights in memory, not two
                return "inplace", "", None, session
            if cache == "inplace":
                raise ToolkitError(f"cache 'inplace' does not apply to {self.model.name} ({self.model.variant}): {why}.")
            return "growing", f"in-place cache not used: {why}", None, None
        part = (self.model.bundle.manifest.generation or {}).get("static")
        if cache == "growing" or (cache == "auto" and (provider != "cuda" or not cuda_graph)):
            return "growing", "", None, None
        if not part:
            why = f"the bundle has no static-cache part (re-export {self.model.name} with --static-cache)"
            if cache == "static":
                raise ToolkitError(f"cache 'static' needs a static-cache graph: {why}.")
            return "growing", f"CUDA graphs not used: {why}", None, None
        graphs = provider == "cuda" and cuda_graph
        try:
            static = Model(self.model.bundle.path / part, variant=self.model.variant, provider=provider, threads=threads, cuda_graph=graphs)
        except ToolkitError as exc:
            if cache == "static":
                raise
            return "growing", f"CUDA graphs not used: {exc}", None, None
        return ("cuda-graph" if graphs else "static"), "", _StaticSessions(static, self.layout), None

    def use_steps(self, step: Callable[[Mapping[str, Any]], dict[str, Any]],
                  encoder_step: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None) -> None:
        """Runs the loop's graph steps with other callables (feeds → outputs by name): the PyTorch
        reference runs this very loop for parity and benchmarks (toolkit.reference.run), over the
        growing cache."""
        self._step = step
        self.decode, self._static, self._inplace = "growing", None, None
        if self.layout.encoder:
            if encoder_step is None:
                raise ToolkitError(f"{self.model.name} is an encoder-decoder: give the encoder's step too.")
            self._encoder_step = encoder_step

    def generate(self, prompt: str | np.ndarray | Sequence[str | np.ndarray], *, max_new_tokens: int = 64, stop: Sequence[str] = (),
                 sampling: Sampling | None = None) -> str | list[str]:
        """The continuation of each prompt (without the prompt), cut before the first stop string or
        the end-of-text token. A list of prompts runs as one left-padded batch. A speech model's
        prompt is its encoder's features, (mels, frames), and a batch of them (batch, mels, frames)."""
        single = isinstance(prompt, str) or (isinstance(prompt, np.ndarray) and prompt.ndim == 2)
        prompts = [prompt] if single else list(prompt)
        streams = [_TextStream(self.tokenizer, stop) for _ in prompts]
        for tokens in self.tokens([self._encode(p, i, len(prompts)) for i, p in enumerate(prompts)],
                                  max_new_tokens=max_new_tokens, sampling=sampling,
                                  done=lambda: [s.finished for s in streams]):
            for s, token in zip(streams, tokens, strict=True):
                s.push(int(token))
        texts = [s.text() for s in streams]
        return texts[0] if single else texts

    def stream(self, prompt: str | np.ndarray, *, max_new_tokens: int = 64, stop: Sequence[str] = (),
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

    def tokens(self, prompts: Sequence[Sequence[int] | np.ndarray], *, max_new_tokens: int = 64, sampling: Sampling | None = None,
               done: Callable[[], Sequence[bool]] | None = None) -> Iterator[np.ndarray]:
        """The token-level loop over prompts of token ids (a speech model's: feature arrays):
        yields each step's new token per row (B,). Rows that produced the
        end-of-text token keep going (their later tokens mean nothing); the loop ends after
        `max_new_tokens` steps, or once `done()` says every row is finished."""
        self._validate(prompts, max_new_tokens)
        return self._loop(prompts, max_new_tokens, (sampling or Sampling()).chooser(), done)

    def _validate(self, prompts: Sequence[Sequence[int] | np.ndarray], max_new_tokens: int) -> None:
        layout = self.layout
        if not prompts:
            raise ToolkitError("no prompt given.")
        if max_new_tokens < 1:
            raise ToolkitError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        if layout.encoder and len(layout.decoder_start) + max_new_tokens > layout.context:
            raise ToolkitError(f"max_new_tokens {max_new_tokens} is beyond what the model's decoder holds "
                               f"({layout.context - len(layout.decoder_start)} tokens after its start tokens); lower it.")
        if layout.features:
            for i, features in enumerate(prompts):
                self._check_features(features, f"prompt {i + 1} of {len(prompts)}" if len(prompts) > 1 else "the prompt")
            return
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
        elif longest + max_new_tokens > layout.context:
            raise ToolkitError(
                f"the longest prompt is {longest} tokens; with max_new_tokens {max_new_tokens} that is "
                f"{longest + max_new_tokens}, beyond the model's context of {layout.context} tokens. "
                "Shorten the prompt or lower max_new_tokens."
            )

    def _loop(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, choose: Callable[[np.ndarray], np.ndarray],
              done: Callable[[], Sequence[bool]] | None) -> Iterator[np.ndarray]:
        layout = self.layout
        finished = np.zeros(len(prompts), dtype=bool)
        eos = np.array(layout.eos_ids)
        with contextlib.ExitStack() as stack:
            if self._static is not None:
                state = self._static.begin(stack)
            elif self._inplace is not None:
                state = _InplaceCache(self._inplace, layout, max_new_tokens, next(o for o in self.model.outputs if o.name == layout.logits))
            else:
                state = _GrowingCache(self._step, layout)
            logits = state.start(self._first_feeds(prompts))
            for step in range(max_new_tokens):
                token = choose(layout.rules.apply(logits, step, step + 1 == max_new_tokens))
                yield token
                finished |= (token[:, None] == eos).any(-1)  # np.isin costs 0.1 ms a step
                if finished.all() or (done is not None and all(done())) or step + 1 == max_new_tokens:
                    return
                logits = state.advance(token)

    def _first_feeds(self, prompts: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """Decoder prompts left-padded; an encoder-decoder's prompts are its right-padded source, which
        its encoder reads once, and its decoder starts from the end-of-text token."""
        layout, batch = self.layout, len(prompts)
        empty = np.zeros((batch, layout.heads, 0, layout.head_size), dtype=layout.past_dtype)
        feeds = {name: empty for name in layout.caches}
        if layout.features:
            source = {self.source.name: np.stack(prompts).astype(self.source.dtype)}
            feeds.update(self._encoder_step(source))
            prompts = [list(layout.decoder_start)] * batch
        elif self._encoder_step is not None:
            longest = max(len(p) for p in prompts)
            source = {"source_ids": np.array([list(p) + [layout.eos_token_id] * (longest - len(p)) for p in prompts], dtype=np.int64),
                      "source_mask": np.array([[1] * len(p) + [0] * (longest - len(p)) for p in prompts], dtype=np.int64)}
            feeds.update({name: value for name, value in (source | self._encoder_step(source)).items() if name in layout.inputs})
            prompts = [list(layout.decoder_start)] * batch
        longest = max(len(p) for p in prompts)
        mask = np.array([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
        feeds["input_ids"] = np.array([[layout.eos_token_id] * (longest - len(p)) + list(p) for p in prompts], dtype=np.int64)
        feeds["attention_mask"] = mask
        if layout.positions:
            feeds["position_ids"] = np.maximum(mask.cumsum(-1) - 1, 0)
        return feeds

    def _check_features(self, prompt: Any, where: str) -> None:
        expected = tuple(self.source.shape[1:])
        if not isinstance(prompt, np.ndarray) or prompt.shape != expected or prompt.dtype.kind != "f":
            got = f"an array {prompt.shape} {prompt.dtype}" if isinstance(prompt, np.ndarray) else type(prompt).__name__
            raise ToolkitError(f"{where}: {self.model.name} is a speech model; a prompt is its encoder's {self.source.name}, a float "
                               f"array {expected} (the feature extractor's output for one clip), got {got}.")

    def _encode(self, prompt: Any, index: int, count: int) -> list[int] | np.ndarray:
        where = f"prompt {index + 1} of {count}" if count > 1 else "the prompt"
        if self.layout.features:
            self._check_features(prompt, where)
            return prompt
        if not isinstance(prompt, str):
            raise ToolkitError(f"{where} must be text, got {type(prompt).__name__}.")
        if not prompt:
            raise ToolkitError(f"{where} is empty; give at least one character to continue.")
        return self.tokenizer.encode(prompt, special_tokens=self._source_special_tokens)


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


class _GrowingCache:
    """Decoding with the bundle's own graph: each step takes the cache the previous one returned, grown
    by one position (an encoder-decoder's source mask and memory stay as the first step had them)."""

    def __init__(self, step: Callable[[Mapping[str, Any]], dict[str, Any]], layout: _Layout):
        self.step, self.layout = step, layout

    def start(self, feeds: dict[str, Any]) -> np.ndarray:
        self.feeds, self.outputs = feeds, self.step(feeds)
        return self.outputs[self.layout.logits][:, -1]

    def advance(self, token: np.ndarray) -> np.ndarray:
        feeds, batch = self.feeds, len(token)
        self.feeds = {
            **feeds,
            "input_ids": token[:, None].astype(np.int64),
            "attention_mask": np.concatenate([feeds["attention_mask"], np.ones((batch, 1), dtype=np.int64)], axis=1),
            **({"position_ids": feeds["position_ids"][:, -1:] + 1} if self.layout.positions else {}),
            **{name: self.outputs["present_" + name.removeprefix("past_")] for name in self.layout.caches},
        }
        self.outputs = self.step(self.feeds)
        return self.outputs[self.layout.logits][:, -1]


class _InplaceCache:
    """One call's decoding through the in-place graph (toolkit.runtime.inplace): a cache per past
    input, allocated for the prompt and every new token, bound once as both that step's past and
    its present; each step binds only its tokens, mask and positions."""

    def __init__(self, session: Any, layout: _Layout, new_tokens: int, logits: TensorSpec):
        self.session, self.layout, self.new_tokens = session, layout, new_tokens
        self.width, self.dtype = logits.shape[-1], np.dtype(logits.dtype)  # a decode step's logits: (batch, 1, width)
        self.logits = None

    def start(self, feeds: dict[str, Any]) -> np.ndarray:
        import onnxruntime as ort

        layout = self.layout
        batch, length = feeds["input_ids"].shape
        self.binding = self.session.io_binding()
        shape = (batch, layout.heads, length + self.new_tokens, layout.head_size)
        # held here for the call: the binding does not keep its values alive
        self.caches = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=layout.past_dtype)) for _ in layout.caches]
        for name, cache in zip(layout.caches, self.caches, strict=True):
            self.binding.bind_ortvalue_input(name, cache)
            self.binding.bind_ortvalue_output("present_" + name.removeprefix("past_"), cache)
        self.mask, self.positions = feeds["attention_mask"], feeds["position_ids"]
        return self._run(feeds["input_ids"])

    def advance(self, token: np.ndarray) -> np.ndarray:
        self.mask = np.concatenate([self.mask, np.ones((len(token), 1), dtype=np.int64)], axis=1)
        self.positions = self.positions[:, -1:] + 1
        return self._run(token[:, None].astype(np.int64))

    def _run(self, ids: np.ndarray) -> np.ndarray:
        binding, name = self.binding, self.layout.logits
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids))
        binding.bind_cpu_input("attention_mask", self.mask)
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(self.positions))
        step = ids.shape[1] == 1 and isinstance(self.width, int)
        if step and self.logits is None:  # every decode step writes the same buffer
            import onnxruntime as ort

            self.logits = ort.OrtValue.ortvalue_from_shape_and_type((len(ids), 1, self.width), self.dtype)
            binding.bind_ortvalue_output(name, self.logits)
        elif not step:
            binding.bind_output(name, "cpu")  # the prompt's logits, one row per token
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime's own exception types are not importable portably
            raise ToolkitError(f"onnxruntime failed in a decode step over the in-place cache: {ort_message(exc)}") from exc
        return (self.logits if step else binding.get_outputs()[-1]).numpy()[:, -1]


class _StaticSessions:
    """The static-cache graph (the bundle's part `static`): every step writes its tokens into a cache
    preallocated to the context, at `cache_position`, and the mask covers the whole cache. On CUDA,
    one graph is captured per batch size and direction and replayed for every decode step; the
    buffers stay allocated for the next call with that batch size."""

    def __init__(self, model: Model, layout: _Layout):
        from toolkit.runtime.graphs import GraphIds

        self.model, self.layout = model, layout
        self.cache_dtype = next(t.dtype for t in model.inputs if t.name == layout.caches[0])
        self.size = next(t.shape[2] for t in model.inputs if t.name == layout.caches[0])
        self._ids = GraphIds()
        self._buffers: dict[int, _DeviceBuffers] = {}
        self._lock = threading.Lock()
        self.bound = model.cuda_graph  # through fixed buffers (captured on CUDA); tests set it on the CPU provider too

    def begin(self, stack: contextlib.ExitStack) -> _StaticCache:
        """A decode state for one call; through the buffers, it holds them until the call ends."""
        if not self.bound:
            return _StaticCache(self, self.model.run_validated)
        stack.enter_context(self._lock)
        return _StaticCache(self, None)

    def buffers(self, batch: int) -> _DeviceBuffers:
        if batch not in self._buffers:
            self._buffers[batch] = _DeviceBuffers(self, batch)
        return self._buffers[batch]


class _StaticCache:
    """One call's decoding over the preallocated cache: numpy feeds through `step`, or (step None)
    the device buffers and captured graphs of `sessions`."""

    def __init__(self, sessions: _StaticSessions, step: Callable[[Mapping[str, Any]], dict[str, Any]] | None):
        self.sessions, self.step, self.layout = sessions, step, sessions.layout

    def start(self, feeds: dict[str, Any]) -> np.ndarray:
        ids, prompt_mask = feeds["input_ids"], feeds["attention_mask"]
        batch, length = ids.shape
        self.mask = np.zeros((batch, self.sessions.size), dtype=np.int64)
        self.mask[:, :length] = prompt_mask
        self.position = feeds["position_ids"][:, -1:]
        self.length = length
        step = {"input_ids": ids, "attention_mask": self.mask, "position_ids": feeds["position_ids"], "cache_position": np.arange(length)}
        if self.step is None:
            self.device = self.sessions.buffers(batch)
            return self.device.prompt(step)
        empty = np.zeros((batch, self.layout.heads, self.sessions.size, self.layout.head_size), dtype=self.sessions.cache_dtype)
        self.outputs = self.step(step | {name: empty for name in self.layout.caches})
        return self.outputs[self.layout.logits][:, -1]

    def advance(self, token: np.ndarray) -> np.ndarray:
        self.mask[:, self.length] = 1
        self.position = self.position + 1
        step = {"input_ids": token[:, None].astype(np.int64), "attention_mask": self.mask, "position_ids": self.position,
                "cache_position": np.array([self.length])}
        self.length += 1
        if self.step is None:
            return self.device.decode(step)
        self.outputs = self.step(step | {name: self.outputs["present_" + name.removeprefix("past_")] for name in self.layout.caches})
        return self.outputs[self.layout.logits][:, -1]


class _DeviceBuffers:
    """A batch size's buffers on the device: the decode step's inputs, two caches that take turns as
    past and present, and the logits; the prompt step runs uncaptured (its length varies), each decode
    direction through a graph of its own."""

    def __init__(self, sessions: _StaticSessions, batch: int):
        import onnxruntime as ort

        from toolkit.runtime.graphs import device_of, run_options

        model, layout, self.layout = sessions.model, sessions.layout, sessions.layout
        self.model = model
        device = device_of(model)

        def zeros(shape: tuple[int, ...], dtype: Any) -> Any:
            return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=dtype), device, 0)

        cache = (batch, layout.heads, sessions.size, layout.head_size)
        self.caches = [{name: zeros(cache, sessions.cache_dtype) for name in layout.caches} for _ in range(2)]
        self.inputs = {"input_ids": zeros((batch, 1), np.int64), "attention_mask": zeros((batch, sessions.size), np.int64),
                       "position_ids": zeros((batch, 1), np.int64), "cache_position": zeros((1,), np.int64)}
        logits = next(o for o in model.outputs if o.name == layout.logits)
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type((batch, 1, logits.shape[-1]), np.dtype(logits.dtype), device, 0)
        self.bindings = []
        for past, present in ((0, 1), (1, 0)):
            binding = model.session.io_binding()
            for name, value in self.inputs.items():
                binding.bind_ortvalue_input(name, value)
            for name in layout.caches:
                binding.bind_ortvalue_input(name, self.caches[past][name])
                binding.bind_ortvalue_output("present_" + name.removeprefix("past_"), self.caches[present][name])
            binding.bind_ortvalue_output(layout.logits, self.logits)
            self.bindings.append((binding, run_options(model, sessions._ids.take())))
        self.uncaptured = run_options(model, -1)
        self.turn = 0

    def prompt(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """The prompt step: writes the cache that the first decode step reads as its past."""
        binding = self.model.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.layout.caches:
            binding.bind_ortvalue_input(name, self.caches[1][name])
            binding.bind_ortvalue_output("present_" + name.removeprefix("past_"), self.caches[0][name])
        binding.bind_output(self.layout.logits, "cpu")
        self._run(binding, self.uncaptured)
        self.turn = 0
        return binding.get_outputs()[-1].numpy()[:, -1]

    def decode(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        for name, value in feeds.items():
            self.inputs[name].update_inplace(np.ascontiguousarray(value))
        binding, options = self.bindings[self.turn]
        self._run(binding, options)
        self.turn ^= 1
        return self.logits.numpy()[:, -1]

    def _run(self, binding: Any, options: Any) -> None:
        try:
            self.model.session.run_with_iobinding(binding, options)
        except Exception as exc:  # onnxruntime's own exception types are not importable portably
            raise ToolkitError(f"onnxruntime failed in a decode step of {self.model.name} ({self.model.variant}): {ort_message(exc)}") from exc


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
        self.eos = tokenizer.eos_ids
        self.decoder = tokenizer.stream_decoder()
        self.stop = [s for s in stop if s]
        self.buffer = ""
        self.sent = 0
        self.finished = False

    def push(self, token: int) -> str:
        """Adds a token; returns the text that is now safe to show."""
        if self.finished:
            return ""
        if token in self.eos:
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

