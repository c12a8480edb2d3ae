"""Why a model answered what it did: attributions of an output to the inputs that drove it, computed on
the ONNX session itself (no torch, no model code; they run wherever the bundle runs).

One module per method, each a class with `attribute(feeds, input, targets, **options)` as Captum's
are: `occlusion` (sliding windows), `shapley` (Shapley value sampling over feature groups),
`kernel_shap` (KernelSHAP: a linear fit over sampled coalitions). Every
method perturbs copies of one example and runs them through the model's batch axis (`scoring`).
`attention` reads a transformer encoder's attention from its graph (rollout); `generation`
explains a decoder's generated tokens.

    explanation = toolkit.explain(model, {"image": images}, method="occlusion", window=(1, 4, 4))
    explanation.attributions["image"]     # shaped like the input; explanation.target: each row's class
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from toolkit.attribution.kernel_shap import KernelShap
from toolkit.attribution.occlusion import Occlusion
from toolkit.attribution.scoring import MaskTokens, Scorer
from toolkit.attribution.shapley import ShapleySampling, patch_mask
from toolkit.errors import ToolkitError

__all__ = ["GRADIENT_METHODS", "METHODS", "Explanation", "attributed_inputs", "Occlusion", "Scorer", "ShapleySampling", "default_window", "explain", "patch_mask", "similarity",
           "token_inputs"]

METHODS = {method.name: method for method in (Occlusion, ShapleySampling, KernelShap)}
# on the bundle's PyTorch source (toolkit.reference.gradients; `toolkit.explain` takes them too)
GRADIENT_METHODS = ("integrated-gradients", "input-x-gradient")


@dataclass
class Explanation:
    """Attributions of `output[row, target[row]]` to each explained input, shaped like it; `score`
    is that output at the inputs as given; `params` the method's, as it ran."""

    method: str
    output: str
    target: np.ndarray
    score: np.ndarray
    attributions: dict[str, np.ndarray]
    params: dict[str, Any] = field(default_factory=dict)
    output_shape: tuple[int, ...] = ()  # the explained output's past its batch axis: `target` indexes it flattened

    def where(self, row: int) -> str:
        """Row `row`'s target as an index into the output: "[3]", or a token classifier's "[5, 2]"."""
        shape = self.output_shape or (int(self.target[row]) + 1,)
        return str([int(i) for i in np.unravel_index(int(self.target[row]), shape)])


def token_inputs(model: Any) -> dict[str, MaskTokens]:
    """{token ids input: how its tokens are removed} for the ids inputs that an attention mask of
    the same shape goes with."""
    masks = [t for t in model.inputs if t.kind == "mask"]
    return {t.name: MaskTokens(mask.name) for t in model.inputs if t.kind == "ids"
            for mask in masks[:1] if tuple(mask.shape) == tuple(t.shape)}


def explain(model: Any, feeds: Mapping[str, Any], *, method: str = "occlusion", target: int | str = "auto",
            inputs: list[str] | None = None, output: str | None = None, chunk: int = 64, similar_to: Any = None,
            run: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]] | None = None, **params: Any) -> Explanation:
    """Explains `model` (a `toolkit.Model`) on `feeds`: `target` is a class index, or "auto" (each
    row's top class); a tuple indexes an output with several axes past the batch axis (a token
    classifier's (position, class)). An embedder's output (task embed, target "auto") is scored by
    its cosine similarity to `similar_to` (one vector, or one per row: "why is this like that"), by default to
    the row's own embedding ("what carries it"). `inputs` the inputs to attribute (default: every
    float input, else the token ids that an attention mask goes with); `output` the output explained
    (default: the first); `params` the method's (occlusion: window (default: a token, 4×4 squares of an image, an element
    of a vector), strides, baseline; shapley:
    feature_mask or patch, samples, seed, baseline; kernel-shap: the same, samples being coalitions; each also as {input: value} where inputs differ
    in shape; rollout: query). A float input's removed elements take the baseline; a token is
    removed by setting its place in the attention mask to 0. `run` runs validated feeds instead of
    the model's session (a server passes its batcher; `model` is then any `Signature`)."""
    if method in GRADIENT_METHODS:
        raise ToolkitError(f"{method} runs on the bundle's PyTorch source: call toolkit.explain (it needs torch and captum).")
    if method not in METHODS and method != "rollout":
        raise ToolkitError(f"unknown method {method!r}; choose {', '.join([*METHODS, 'rollout', *GRADIENT_METHODS])}.")
    arrays = model.validate(feeds)
    output = output or model.outputs[0].name
    if output not in {t.name for t in model.outputs}:
        raise ToolkitError(f"unknown output {output!r}; the model gives {', '.join(t.name for t in model.outputs)}.")
    names, ablations = attributed_inputs(model, arrays, inputs)
    run = run or model.run_validated
    if similar_to is not None or (model.bundle.manifest.task == "embed" and target == "auto"):
        run, target, _ = similarity(run, output, arrays, similar_to, target)
        params["score"] = "cosine similarity to " + ("similar_to" if similar_to is not None else "the row's own embedding")
    scorer = Scorer(run, output, chunk)
    targets, score = scorer.answer(arrays, target)
    if method == "rollout":
        attributions = _rollout(model, arrays, names, ablations, **params)
    else:
        attributions = _perturbed(METHODS[method](scorer), arrays, names, targets, ablations, method, params)
    return Explanation(method, output, targets, score, attributions,
                       {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in params.items()}, scorer.shape)


def attributed_inputs(model: Any, arrays: Mapping[str, np.ndarray], inputs: list[str] | None) -> tuple[list[str], dict[str, MaskTokens]]:
    """(the inputs to attribute: `inputs`, default every float input, else the token ids that an
    attention mask goes with; how each token ids input's tokens are removed)."""
    ablations = token_inputs(model)
    names = inputs or [t.name for t in model.inputs if np.dtype(t.dtype).kind == "f"] or list(ablations)
    unknown = [n for n in names if n not in arrays or (np.dtype(arrays[n].dtype).kind != "f" and n not in ablations)]
    if unknown or not names:
        what = f"input {unknown[0]!r} is" if unknown else "the model has"
        raise ToolkitError(f"nothing to attribute: {what} neither a float input nor token ids with an attention mask; "
                           f"its inputs: {', '.join(arrays)}.")
    return names, ablations


def default_window(shape: tuple[int, ...]) -> list[int]:
    """An occlusion window for an input row shaped `shape`: 4 on an image's two last axes and 1 before
    them; 1 on a vector."""
    return [1] * len(shape) if len(shape) < 2 else [1] * (len(shape) - 2) + [min(4, shape[-2]), min(4, shape[-1])]


def similarity(run: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]], output: str, feeds: Mapping[str, np.ndarray],
               similar_to: Any, target: Any) -> tuple[Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]], Any, np.ndarray]:
    """(`run` with `output` replaced by its cosine similarity to each reference vector, the target,
    the references as unit rows): the references are `similar_to` (one vector or one per row;
    target: the row's), else the rows' own outputs for `feeds` (target: each row its own)."""
    rows = len(next(iter(feeds.values())))
    if similar_to is None:
        references = np.asarray(run(feeds)[output], dtype=np.float64).reshape(rows, -1)
    else:
        references = np.atleast_2d(np.asarray(similar_to, dtype=np.float64))
        if references.ndim != 2 or len(references) not in (1, rows):
            raise ToolkitError(f"similar_to {list(np.shape(similar_to))}: give one vector, or one per row ({rows} rows).")
    references = references / np.maximum(np.linalg.norm(references, axis=1, keepdims=True), 1e-12)

    def cosine(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = np.asarray(run(batch)[output], dtype=np.float64).reshape(len(next(iter(batch.values()))), -1)
        if values.shape[1] != references.shape[1]:
            raise ToolkitError(f"similar_to has {references.shape[1]} values; output {output!r} has {values.shape[1]} per row.")
        return {output: values / np.maximum(np.linalg.norm(values, axis=1, keepdims=True), 1e-12) @ references.T}

    if target == "auto":
        target = [0] * rows if len(references) == 1 else list(range(rows))
    return cosine, target, references


def _perturbed(attributor: Any, arrays: dict[str, np.ndarray], names: list[str], targets: np.ndarray,
               ablations: dict[str, MaskTokens], method: str, params: dict[str, Any]) -> dict[str, np.ndarray]:
    import inspect

    signature = inspect.signature(attributor.attribute).parameters
    accepted = [n for n, p in signature.items() if p.kind is p.KEYWORD_ONLY and n != "ablation"] + (["patch"] if "feature_mask" in signature else [])
    unknown = sorted(set(params) - set(accepted) - {"score"})
    if unknown:
        raise ToolkitError(f"{method} takes {', '.join(accepted)}; not {', '.join(unknown)}.")
    attributions = {}
    for name in names:
        options = {k: v[name] if isinstance(v, Mapping) and k in ("window", "strides", "feature_mask", "baseline") else v
                   for k, v in params.items() if k != "score"}  # inputs shaped differently take a window each: {input: window}
        if method in ("shapley", "kernel-shap") and "patch" in options:
            options["feature_mask"] = patch_mask(arrays[name].shape[1:], options.pop("patch"))
        if method == "occlusion" and "window" not in options:  # a token at a time; 4×4 squares of an image
            options["window"] = (1,) if name in ablations else default_window(arrays[name].shape[1:])
        attributions[name] = attributor.attribute(arrays, name, targets, ablation=ablations.get(name), **options)
    return attributions


def _rollout(model: Any, arrays: dict[str, np.ndarray], names: list[str], ablations: dict[str, MaskTokens],
             query: str = "first", **unknown: Any) -> dict[str, np.ndarray]:
    from toolkit.attribution.attention import attention_maps, rollout

    unknown.pop("score", None)
    if unknown:
        raise ToolkitError(f"rollout takes no {', '.join(unknown)}; its one option is query ('first' or 'mean').")
    tokens = [name for name in names if name in ablations]
    if not tokens or not hasattr(model, "bundle") or not hasattr(model, "session"):
        raise ToolkitError("attention rollout explains the token ids of a transformer encoder run in this process (toolkit.load): "
                           "it reads the graph's attention, not a served model's answers.")
    mask = arrays[ablations[tokens[0]].mask]
    return {tokens[0]: rollout(attention_maps(model, arrays), mask, query) * mask}
