"""Why a decoder generated each token: every generated token's log-probability attributed to the
tokens before it (the prompt's, and the ones generated before it), with the perturbation methods
on the ONNX session. A context token is removed through the attention mask, as left padding is
(positions counted over the tokens kept), in a full pass over the context without a cache, and the
prediction is read after the last token kept."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from toolkit.attribution.occlusion import Occlusion
from toolkit.attribution.scoring import MaskTokens, Scorer
from toolkit.attribution.shapley import ShapleySampling
from toolkit.errors import ToolkitError

__all__ = ["GenerationExplanation", "comprehensiveness", "explain_generation"]

_METHODS = {method.name: method for method in (Occlusion, ShapleySampling)}


@dataclass
class GenerationExplanation:
    """`attributions[k, j]`: context token j's credit for generated token k's log-probability
    (`logprob[k]`); the context is `prompt + tokens`, and row k covers its first len(prompt) + k
    places (NaN after them). `pieces` is each context token's text, where the bundle has a tokenizer."""

    method: str
    prompt: list[int]
    tokens: list[int]
    logprob: np.ndarray
    attributions: np.ndarray
    pieces: list[str] | None = None
    params: dict[str, Any] = field(default_factory=dict)


def explain_generation(model: Any, prompt: str | Sequence[int], *, max_new_tokens: int = 8, tokens: Sequence[int] | None = None,
                       method: str = "occlusion", chunk: int = 32, **params: Any) -> GenerationExplanation:
    """Explains a decoder (`model`, a `toolkit.Model` of a decoder bundle) continuing `prompt` (text,
    or token ids): greedily for up to `max_new_tokens` tokens, or the continuation `tokens` given
    (what a user saw it sample). `method`: "occlusion" (a token at a time) or "shapley" (`samples`
    orderings of the context's tokens, `seed`)."""
    from toolkit.runtime.generate import Generator, greedy_tokens
    from toolkit.runtime.generate.layout import Layout
    from toolkit.runtime.tokenizer import tokenizer_for

    if method not in _METHODS:
        raise ToolkitError(f"generated tokens are explained by {' or '.join(_METHODS)}, not {method!r}.")
    generation = model.bundle.manifest.generation
    layout = Layout.of(model.name, model.inputs, model.outputs, generation)
    if layout.encoder:
        raise ToolkitError(f"{model.name} is an encoder-decoder; explaining generated tokens covers decoder-only models.")
    try:
        tokenizer = tokenizer_for(generation, model.bundle)
    except ToolkitError:
        tokenizer = None
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ToolkitError(f"{model.name}'s bundle has no tokenizer: give the prompt as token ids.")
        prompt = tokenizer.encode(prompt)
    prompt = [int(t) for t in prompt]
    if not prompt or not all(0 <= t < layout.vocab for t in prompt):
        raise ToolkitError(f"the prompt must be one token id or more, each in [0, {layout.vocab}).")
    if tokens is None:
        if max_new_tokens < 1:
            raise ToolkitError(f"max_new_tokens {max_new_tokens}: explain at least one generated token.")
        generated = greedy_tokens(Generator(model, cache="growing"), [prompt], max_new_tokens)[0].tolist()
        ends = [i for i, t in enumerate(generated) if t in layout.eos_ids]
        tokens = generated[: ends[0] + 1] if ends else generated
    tokens = [int(t) for t in tokens]
    if not tokens or len(prompt) + len(tokens) > layout.context or not all(0 <= t < layout.vocab for t in tokens):
        raise ToolkitError(f"the continuation must be one token id or more, each in [0, {layout.vocab}), and fit the context of "
                           f"{layout.context} tokens with the prompt.")
    scorer = Scorer(_next_token_logprobs(model, layout), "logprobs", chunk)
    attributor = _METHODS[method](scorer)
    options = {"window": (1,), **params} if method == "occlusion" else params
    context = prompt + tokens
    attributions = np.full((len(tokens), len(context) - 1), np.nan)
    logprob = np.empty(len(tokens))
    for k, token in enumerate(tokens):
        length = len(prompt) + k
        feeds = {"input_ids": np.array([context[:length]], dtype=np.int64), "attention_mask": np.ones((1, length), dtype=np.int64)}
        target, score = scorer.answer(feeds, [token])
        logprob[k] = score[0]
        attributions[k, :length] = attributor.attribute(feeds, "input_ids", target, ablation=MaskTokens("attention_mask"), **options)[0]
    pieces = [tokenizer.decode([t]) for t in context] if tokenizer is not None else None
    return GenerationExplanation(method, prompt, tokens, logprob, attributions, pieces, {"method": method, **params})


def comprehensiveness(model: Any, explained: GenerationExplanation, *, fractions: Sequence[float] = (0.01, 0.05, 0.1, 0.2, 0.5),
                      random_orders: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """How much the credited context matters (ERASER's comprehensiveness, DeYoung et al. 2020): per
    generated token, its log-probability's drop when the most credited `fractions` of its context
    are removed, averaged over the fractions; and the same for as many tokens removed at random
    (averaged over `random_orders` orders)."""
    from toolkit.runtime.generate.layout import Layout

    run = _next_token_logprobs(model, Layout.of(model.name, model.inputs, model.outputs, model.bundle.manifest.generation))
    context, rng = explained.prompt + explained.tokens, np.random.default_rng(seed)
    attributed, random = np.empty(len(explained.tokens)), np.empty(len(explained.tokens))
    for k, token in enumerate(explained.tokens):
        length = len(explained.prompt) + k
        orders = [np.argsort(-explained.attributions[k, :length], kind="stable")] + [rng.permutation(length) for _ in range(random_orders)]
        masks = np.ones((len(orders) * len(fractions), length), dtype=np.int64)
        for i, (order, fraction) in enumerate((o, f) for o in orders for f in fractions):
            masks[i, order[: int(np.ceil(fraction * length))]] = 0
        ids = np.repeat(np.array([context[:length]], dtype=np.int64), len(masks), axis=0)
        drops = (explained.logprob[k] - run({"input_ids": ids, "attention_mask": masks})["logprobs"][:, token]).reshape(len(orders), -1)
        attributed[k], random[k] = drops[0].mean(), drops[1:].mean()
    return attributed, random


def _next_token_logprobs(model: Any, layout: Any) -> Any:
    """feeds {input_ids, attention_mask} (batch × context, no cache) → {"logprobs": the next token's
    log-probabilities, read after the last token kept}; with every token removed, the model knows
    nothing: uniform."""

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        mask = feeds["attention_mask"]
        empty = np.zeros((len(mask), layout.heads, 0, layout.head_size), dtype=layout.past_dtype)
        full = {"input_ids": feeds["input_ids"], "attention_mask": mask, **dict.fromkeys(layout.caches, empty)}
        if layout.positions:
            full["position_ids"] = np.maximum(mask.cumsum(-1) - 1, 0)
        logits = model.run_validated(full)[layout.logits]
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
        chosen = np.asarray(logits[np.arange(len(mask)), last], dtype=np.float64)
        chosen[~mask.any(axis=1)] = 0.0
        shifted = chosen - chosen.max(axis=-1, keepdims=True)
        return {"logprobs": shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))}

    return run
