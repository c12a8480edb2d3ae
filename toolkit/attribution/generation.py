"""Why a decoder generated each token: every generated token's log-probability attributed to the
tokens before it (the prompt's, and the ones generated before it), with the perturbation methods
on the ONNX session. A context token is removed through the attention mask, as left padding is
(positions counted over the tokens kept), in a full pass over the context without a cache, and the
prediction is read after the last token kept. An encoder-decoder's answer tokens are attributed to
its source, a source token removed through the source mask, the decoder teacher-forced."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from toolkit.attribution.kernel_shap import KernelShap
from toolkit.attribution.occlusion import Occlusion
from toolkit.attribution.scoring import MaskTokens, Scorer
from toolkit.attribution.shapley import ShapleySampling
from toolkit.errors import ToolkitError

__all__ = ["GenerationExplanation", "comprehensiveness", "explain_generation"]

_METHODS = {method.name: method for method in (Occlusion, ShapleySampling, KernelShap)}


@dataclass
class GenerationExplanation:
    """`attributions[k, j]`: context token j's credit for generated token k's log-probability
    (`logprob[k]`). A decoder's context is `prompt + tokens` and row k covers its first
    len(prompt) + k places (NaN after them); an encoder-decoder's is its source, `prompt`, for every
    row. `pieces` is each token's text (the context's, then the generated ones'), where the bundle
    has a tokenizer."""

    method: str
    prompt: list[int]
    tokens: list[int]
    logprob: np.ndarray
    attributions: np.ndarray
    pieces: list[str] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    source: bool = False  # an encoder-decoder: the context is the source alone

    def context(self, k: int) -> int:
        """How many context tokens generated token k is attributed to."""
        return len(self.prompt) + (0 if self.source else k)

    def texts(self) -> list[str]:
        """Each token's text: the prompt's, then the generated ones' (their ids where there is no tokenizer)."""
        return self.pieces or [str(t) for t in self.prompt + self.tokens]


def explain_generation(model: Any, prompt: str | Sequence[int], *, max_new_tokens: int = 8, tokens: Sequence[int] | None = None,
                       method: str = "occlusion", chunk: int | None = None, **params: Any) -> GenerationExplanation:
    """Explains a decoder or an encoder-decoder (`model`, a `toolkit.Model` of its bundle) continuing
    (answering) `prompt` (text, or token ids): greedily for up to `max_new_tokens` tokens, or the
    continuation `tokens` given (what a user saw it sample). A decoder's tokens are attributed to the
    prompt and the tokens generated before them, an encoder-decoder's to its source, a source token
    removed through the source mask. `method`: "occlusion" (a token at a time), "shapley"
    (`samples` orderings of the context's tokens, `seed`) or "kernel-shap" (`samples` coalitions); `chunk` perturbed copies per run (default:
    a quarter of the context, at least 8: a decoder's copies then share more of their prefix,
    which runs once per chunk)."""
    from toolkit.runtime.generate import Generator, greedy_tokens

    if method not in _METHODS:
        raise ToolkitError(f"generated tokens are explained by {', '.join(_METHODS)}, not {method!r}.")
    generator = Generator(model, cache="growing")
    layout = generator.layout
    if layout.features:
        raise ToolkitError(f"{model.name} is a speech model: its source is audio features, not tokens a mask removes; "
                           "explaining its tokens covers text models.")
    if isinstance(prompt, str):
        prompt = generator.encode(prompt)
    prompt = [int(t) for t in prompt]
    vocab = generator.source.high if layout.encoder else layout.vocab
    if not prompt or not all(0 <= t < vocab for t in prompt):
        raise ToolkitError(f"the prompt must be one token id or more, each in [0, {vocab}).")
    if tokens is None:
        if max_new_tokens < 1:
            raise ToolkitError(f"max_new_tokens {max_new_tokens}: explain at least one generated token.")
        generated = greedy_tokens(generator, [prompt], max_new_tokens)[0].tolist()
        ends = [i for i, t in enumerate(generated) if t in layout.eos_ids]
        tokens = generated[: ends[0] + 1] if ends else generated
    tokens = [int(t) for t in tokens]
    room = layout.context - (len(layout.decoder_start) if layout.encoder else len(prompt))
    if not tokens or len(tokens) > room or not all(0 <= t < layout.vocab for t in tokens):
        raise ToolkitError(f"the continuation must be one token id or more, each in [0, {layout.vocab}), and fit the context of "
                           f"{layout.context} tokens" + ("." if layout.encoder else " with the prompt."))
    run, ids, mask = _context_run(generator, tokens)
    scorer = Scorer(run, "logprobs")
    attributor = _METHODS[method](scorer)
    options = {"window": (1,), **params} if method == "occlusion" else params
    context = prompt + ([] if layout.encoder else tokens)
    attributions = np.full((len(tokens), max(len(prompt), len(context) - 1)), np.nan)
    logprob = np.empty(len(tokens))
    for k, token in enumerate(tokens):
        length = len(prompt) + (0 if layout.encoder else k)
        scorer.chunk = chunk or max(8, -(-length // 4))
        feeds = _context_feeds(ids, mask, np.array([context[:length]], dtype=np.int64), np.ones((1, length), dtype=np.int64), k)
        target, score = scorer.answer(feeds, [token])
        logprob[k] = score[0]
        attributions[k, :length] = attributor.attribute(feeds, ids, target, ablation=MaskTokens(mask), **options)[0]
    pieces = None
    if generator.tokenizer is not None:
        pieces = [generator.tokenizer.decode([t]) for t in prompt + tokens]
    return GenerationExplanation(method, prompt, tokens, logprob, attributions, pieces, {"method": method, **params}, bool(layout.encoder))


def comprehensiveness(model: Any, explained: GenerationExplanation, *, fractions: Sequence[float] = (0.01, 0.05, 0.1, 0.2, 0.5),
                      random_orders: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """How much the credited context matters (ERASER's comprehensiveness, DeYoung et al. 2020): per
    generated token, its log-probability's drop when the most credited `fractions` of its context
    are removed, averaged over the fractions; and the same for as many tokens removed at random
    (averaged over `random_orders` orders)."""
    from toolkit.runtime.generate import Generator

    run, ids_name, mask_name = _context_run(Generator(model, cache="growing"), explained.tokens)
    context = explained.prompt + ([] if explained.source else explained.tokens)
    rng = np.random.default_rng(seed)
    attributed, random = np.empty(len(explained.tokens)), np.empty(len(explained.tokens))
    for k, token in enumerate(explained.tokens):
        length = explained.context(k)
        orders = [np.argsort(-explained.attributions[k, :length], kind="stable")] + [rng.permutation(length) for _ in range(random_orders)]
        masks = np.ones((len(orders) * len(fractions), length), dtype=np.int64)
        for i, (order, fraction) in enumerate((o, f) for o in orders for f in fractions):
            masks[i, order[: int(np.ceil(fraction * length))]] = 0
        ids = np.repeat(np.array([context[:length]], dtype=np.int64), len(masks), axis=0)
        scores = run(_context_feeds(ids_name, mask_name, ids, masks, k))["logprobs"][:, token]
        drops = (explained.logprob[k] - scores).reshape(len(orders), -1)
        attributed[k], random[k] = drops[0].mean(), drops[1:].mean()
    return attributed, random


def _context_run(generator: Any, tokens: list[int]) -> tuple[Any, str, str]:
    """(feeds → {"logprobs"}, the token ids input attributed, the mask that removes them)."""
    if generator.layout.encoder:
        return _answer_logprobs(generator, tokens), "source_ids", "source_mask"
    return _next_token_logprobs(generator.model, generator.layout), "input_ids", "attention_mask"


def _context_feeds(ids_name: str, mask_name: str, ids: np.ndarray, mask: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The feeds that score generated token k: an encoder-decoder's also say which answer token is
    read (its run teacher-forces the ones before it)."""
    feeds = {ids_name: ids, mask_name: mask}
    if ids_name == "source_ids":
        feeds["step"] = np.full(len(ids), k, dtype=np.int64)
    return feeds


def _answer_logprobs(generator: Any, tokens: list[int]) -> Any:
    """feeds {source_ids, source_mask, step} (batch × source) → {"logprobs": the encoder-decoder's
    log-probabilities for answer token `step`, its decoder fed the start and the answer before it}."""
    layout = generator.layout

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        source = {"source_ids": feeds["source_ids"], "source_mask": feeds["source_mask"]}
        batch, step = len(source["source_ids"]), int(feeds["step"][0])
        prefix = np.array([list(layout.decoder_start) + tokens[:step]] * batch, dtype=np.int64)
        empty = np.zeros((batch, layout.heads, 0, layout.head_size), dtype=layout.past_dtype)
        decoder = {"input_ids": prefix, "attention_mask": np.ones_like(prefix), **dict.fromkeys(layout.caches, empty),
                   **{name: value for name, value in (source | generator._encoder_step(source)).items() if name in layout.inputs}}
        if layout.positions:
            decoder["position_ids"] = np.broadcast_to(np.arange(prefix.shape[1]), prefix.shape).copy()
        return {"logprobs": _log_softmax(np.asarray(generator._step(decoder)[layout.logits][:, -1], dtype=np.float64))}

    return run


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _next_token_logprobs(model: Any, layout: Any) -> Any:
    """feeds {input_ids, attention_mask} (batch × context) → {"logprobs": the next token's
    log-probabilities, read after the last token kept}; with every token removed, the model knows
    nothing: uniform. Where every row keeps the same first tokens (occlusion's windows, run in
    order), those run once, and the rows carry on from their cache: a causal model's prefix does
    not depend on what follows it."""
    prefixes: dict[bytes, dict[str, np.ndarray]] = {}  # the cache of a kept prefix, by its token ids

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        batch, length = mask.shape
        shared = int(np.argmin(np.r_[(mask == 1).all(axis=0) & (ids == ids[0]).all(axis=0), False]))
        last = length - 1 - np.argmax(mask[:, ::-1], axis=1)  # each row's last kept token: the prediction is read after it
        shared = min(shared, int(last.min()))  # so that it runs, in every row
        past = dict.fromkeys(layout.caches, np.zeros((batch, layout.heads, 0, layout.head_size), dtype=layout.past_dtype))
        if shared:
            key = ids[0, :shared].tobytes()
            if key not in prefixes:
                prefixes.clear()  # one prefix at a time: the windows move along the context
                prefixes[key] = _step(model, layout, ids[:1, :shared], np.ones((1, shared), dtype=np.int64), 0,
                                      dict.fromkeys(layout.caches, past[layout.caches[0]][:1]))[1]
            past = {name: np.repeat(value, batch, axis=0) for name, value in prefixes[key].items()}
        logits, _ = _step(model, layout, ids[:, shared:], mask, shared, past)
        chosen = np.asarray(logits[np.arange(batch), last - shared], dtype=np.float64)
        chosen[~mask.any(axis=1)] = 0.0
        return {"logprobs": _log_softmax(chosen)}

    return run


def _step(model: Any, layout: Any, ids: np.ndarray, mask: np.ndarray, start: int, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(logits of the new tokens `ids`, the cache after them): `mask` covers the `start` tokens of
    `past` and the new ones; positions count the tokens kept."""
    feeds = {"input_ids": ids, "attention_mask": mask, **past}
    if layout.positions:
        feeds["position_ids"] = np.maximum(mask.cumsum(-1) - 1, 0)[:, start:]
    outputs = model.run_validated(feeds)
    return outputs[layout.logits], {name: outputs["present_" + name.removeprefix("past_")] for name in layout.caches}
