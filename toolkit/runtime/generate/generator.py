"""`toolkit.Generator`: one call's prompts decoded together as a left-padded batch, greedy or
sampled, over the cache the graph and provider allow (toolkit.runtime.generate.caches)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.runtime.generate.caches import GrowingCache, InplaceCache, StaticSessions, step_of
from toolkit.runtime.generate.layout import Layout
from toolkit.runtime.generate.sampling import Sampling
from toolkit.runtime.generate.text import TextStream
from toolkit.runtime.model import Model
from toolkit.runtime.tokenizer import tokenizer_for

__all__ = ["CACHES", "Generator", "greedy_tokens", "token_agreement"]

CACHES = ("auto", "growing", "inplace", "static")


class Generator:
    """Generates text from a decoder bundle: `Generator(path_or_model).generate("Return the")`."""

    def __init__(self, model: Model | str | os.PathLike[str], *, variant: str | None = None, provider: str = "auto",
                 threads: int | None = None, cache: str = "auto", cuda_graph: bool = True, key: str | os.PathLike[str] | None = None):
        """`cache`: "growing" feeds each step the cache the last one returned (the bundle's own graph);
        "inplace" (CPU) writes each step into one cache allocated per call, through the graph made
        for it (toolkit.runtime.inplace); "static" decodes over a cache preallocated to the context
        (the bundle's part `static`), on CUDA replaying captured CUDA graphs unless `cuda_graph` is
        False. "auto": on CUDA, static with CUDA graphs where the bundle has that part; on the CPU,
        inplace where the variant's graph allows it and this Generator opened the bundle itself
        (it then releases the bundle graph's session: `model.run` is not available); growing
        otherwise, and `note` says why. `key` opens an encrypted bundle (see `toolkit.load`)."""
        if cache not in CACHES:
            raise ToolkitError(f"unknown cache {cache!r}; choose {', '.join(CACHES)}.")
        owned = not isinstance(model, Model)
        if owned:
            model = Model(model, variant=variant, provider=provider, threads=threads, key=key)
        manifest = model.bundle.manifest
        self.model = model
        self.layout = Layout.of(model.name, model.inputs, model.outputs, manifest.generation)
        self.tokenizer = tokenizer_for(manifest.generation, model.bundle)
        # an encoder-decoder's source is tokenized as in training (BART's <s> ... </s>, T5's ... </s>)
        self._source_special_tokens = bool(manifest.generation.get("source_special_tokens"))
        self._step = step_of(model, {"present_" + name.removeprefix("past_") for name in self.layout.caches})
        self._encoder_step = None
        if self.layout.encoder:
            encoder = Model(model.bundle.part(self.layout.encoder), variant=model.variant, provider=model.provider, threads=threads)
            self._encoder_step = step_of(encoder, {o.name for o in encoder.outputs})
            self.source = encoder.inputs[0]  # what a prompt is: source_ids, or a speech model's input_features
        self.decode, self.note, self._static, self._inplace = self._choose_cache(cache, threads, cuda_graph, owned)

    def _choose_cache(self, cache: str, threads: int | None, cuda_graph: bool, owned: bool) -> tuple[str, str, StaticSessions | None, Any]:
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
                session, why = inplace_session(self.model.bundle.graph(self.model.variant), threads)
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
            static = Model(self.model.bundle.part(part), variant=self.model.variant, provider=provider, threads=threads, cuda_graph=graphs)
        except ToolkitError as exc:
            if cache == "static":
                raise
            return "growing", f"CUDA graphs not used: {exc}", None, None
        return ("cuda-graph" if graphs else "static"), "", StaticSessions(static, self.layout), None

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
        streams = [TextStream(self.tokenizer, stop) for _ in prompts]
        for tokens in self.tokens([self.encode(p, i, len(prompts)) for i, p in enumerate(prompts)],
                                  max_new_tokens=max_new_tokens, sampling=sampling,
                                  done=lambda: [s.finished for s in streams]):
            for s, token in zip(streams, tokens, strict=True):
                s.push(int(token))
        for s in streams:
            s.close()  # a row cut by the length limit keeps what its last tokens decode to, a character cut short included
        texts = [s.text() for s in streams]
        return texts[0] if single else texts

    def stream(self, prompt: str | np.ndarray, *, max_new_tokens: int = 64, stop: Sequence[str] = (),
               sampling: Sampling | None = None) -> Iterator[str]:
        """Yields the continuation of one prompt piece by piece, as tokens arrive; the pieces join to
        what `generate` returns (text that may begin a stop string is held back until it cannot).
        Bad arguments raise here, before the first piece."""
        text = TextStream(self.tokenizer, stop)
        steps = self.tokens([self.encode(prompt, 0, 1)], max_new_tokens=max_new_tokens, sampling=sampling,
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
                state = InplaceCache(self._inplace, layout, max_new_tokens, next(o for o in self.model.outputs if o.name == layout.logits))
            else:
                state = GrowingCache(self._step, layout)
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

    def encode(self, prompt: Any, index: int = 0, count: int = 1) -> list[int] | np.ndarray:
        """A prompt as the loop takes it: text as token ids (as the model was trained: an
        encoder-decoder's source with its special tokens), a speech model's features checked."""
        where = f"prompt {index + 1} of {count}" if count > 1 else "the prompt"
        if self.layout.features:
            self._check_features(prompt, where)
            return prompt
        if not isinstance(prompt, str):
            raise ToolkitError(f"{where} must be text, got {type(prompt).__name__}.")
        if not prompt:
            raise ToolkitError(f"{where} is empty; give at least one character to continue.")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON's "\ud800" decodes to one, which no tokenizer takes
            raise ToolkitError(f"{where} holds a lone surrogate ({prompt[exc.start]!r} at character {exc.start}); "
                               "text must be valid Unicode.") from None
        return self.tokenizer.encode(prompt, special_tokens=self._source_special_tokens)


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
