"""Why a model answered what it did: attributions of an output to the inputs that drove it, computed on
the ONNX session itself (no torch, no model code; they run wherever the bundle runs).

One module per method, each a class with `attribute(feeds, input, targets, **options)` as Captum's
are: `occlusion` (sliding windows), `shapley` (Shapley value sampling over feature groups). Every
method perturbs copies of one example and runs them through the model's batch axis (`scoring`).

    explanation = toolkit.explain(model, {"image": images}, method="occlusion", window=(1, 4, 4))
    explanation.attributions["image"]     # shaped like the input; explanation.target: each row's class
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from toolkit.attribution.occlusion import Occlusion
from toolkit.attribution.scoring import MaskTokens, Scorer
from toolkit.attribution.shapley import ShapleySampling, patch_mask
from toolkit.errors import ToolkitError

__all__ = ["METHODS", "Explanation", "Occlusion", "Scorer", "ShapleySampling", "explain", "patch_mask"]

METHODS = {method.name: method for method in (Occlusion, ShapleySampling)}


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


def _ablations(model: Any) -> dict[str, MaskTokens]:
    """{token ids input: how its tokens are removed} for the ids inputs that an attention mask of
    the same shape goes with."""
    masks = [t for t in model.inputs if t.kind == "mask"]
    return {t.name: MaskTokens(mask.name) for t in model.inputs if t.kind == "ids"
            for mask in masks[:1] if tuple(mask.shape) == tuple(t.shape)}


def explain(model: Any, feeds: Mapping[str, Any], *, method: str = "occlusion", target: int | str = "auto",
            inputs: list[str] | None = None, output: str | None = None, chunk: int = 64,
            run: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]] | None = None, **params: Any) -> Explanation:
    """Explains `model` (a `toolkit.Model`) on `feeds`: `target` is a class index, or "auto" (each
    row's top class); `inputs` the inputs to attribute (default: every float input, else the token
    ids that an attention mask goes with); `output` the output explained (default: the first);
    `params` the method's (occlusion: window, strides, baseline; shapley: feature_mask or patch,
    samples, seed, baseline). A float input's removed elements take the baseline; a token is removed
    by setting its place in the attention mask to 0. `run` runs validated feeds instead of the
    model's session (a server passes its batcher; `model` is then any `Signature`)."""
    if method not in METHODS:
        raise ToolkitError(f"unknown method {method!r}; choose {', '.join(METHODS)}.")
    arrays = model.validate(feeds)
    output = output or model.outputs[0].name
    if output not in {t.name for t in model.outputs}:
        raise ToolkitError(f"unknown output {output!r}; the model gives {', '.join(t.name for t in model.outputs)}.")
    ablations = _ablations(model)
    names = inputs or [t.name for t in model.inputs if np.dtype(t.dtype).kind == "f"] or list(ablations)
    unknown = [n for n in names if n not in arrays or (np.dtype(arrays[n].dtype).kind != "f" and n not in ablations)]
    if unknown or not names:
        what = f"input {unknown[0]!r} is" if unknown else "the model has"
        raise ToolkitError(f"nothing to attribute: {what} neither a float input nor token ids with an attention mask; "
                           f"its inputs: {', '.join(arrays)}.")
    scorer = Scorer(run or model.run_validated, output, chunk)
    targets, score = scorer.answer(arrays, target)
    attributor = METHODS[method](scorer)
    attributions = {}
    for name in names:
        options = dict(params)
        if method == "shapley" and "patch" in options:
            options["feature_mask"] = patch_mask(arrays[name].shape[1:], options.pop("patch"))
        if method == "occlusion" and "window" not in options:
            if name not in ablations:
                raise ToolkitError("occlusion needs a window: one size per axis of the input past its batch axis (an image's (1, 4, 4)).")
            options["window"] = (1,)  # a token at a time
        attributions[name] = attributor.attribute(arrays, name, targets, ablation=ablations.get(name), **options)
    return Explanation(method, output, targets, score, attributions,
                       {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in params.items()})
