"""Gradient methods (integrated gradients, input × gradient) with Captum on the bundle's PyTorch
source: ONNX graphs carry no gradients, so these explain the source the variant was compiled from.
Two checks say how far that explanation holds: completeness (integrated gradients' attributions
sum to f(x) - f(baseline); Captum's convergence delta, reported per row) and the source's own
score against the ONNX variant's on the same inputs (`source_gap`).

Token ids have no gradient: their attributions are those of the embedding the ids are looked up in
(found by watching which `nn.Embedding` reads the ids), summed over its width; the baseline is a
sequence of one token id (default 0, often the padding token)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from toolkit.attribution import GRADIENT_METHODS, Explanation, Scorer, attributed_inputs, similarity
from toolkit.errors import ToolkitError

__all__ = ["explain_gradients"]


def explain_gradients(model: Any, feeds: Mapping[str, Any], *, method: str = "integrated-gradients", target: Any = "auto",
                      inputs: list[str] | None = None, output: str | None = None, steps: int = 50, baseline: float = 0.0,
                      baseline_token: int = 0, similar_to: Any = None, trust_source: bool = False) -> Explanation:
    """Attributions of `model`'s (a `toolkit.Model`) target score to its inputs, from its bundle's
    PyTorch source (rebuilt under the trust rules of `bundle_reference`: open the model with
    `trust_source=True` for a factory or Hugging Face source). `target` as `toolkit.explain`'s,
    chosen from the ONNX variant's answer; `steps` integrated gradients' path steps; `baseline` a
    float input's, `baseline_token` token ids'. `params` records `completeness` (integrated
    gradients: per row, sum of attributions - (f(x) - f(baseline)), and that relative to
    |f(x) - f(baseline)|) and `source_gap` (max |source - variant| of the target score, and the
    source's score scale). An embedder's score is a cosine similarity, as `toolkit.explain`'s
    (`similar_to`). `trust_source` vouches for the source, as --trust-source does."""
    import copy

    import torch

    from toolkit.reference.source import bundle_reference

    if method not in GRADIENT_METHODS:
        raise ToolkitError(f"unknown gradient method {method!r}; choose {', '.join(GRADIENT_METHODS)}.")
    if steps < 2:
        raise ToolkitError(f"steps {steps}: integrated gradients needs at least 2 points on its path.")
    arrays = model.validate(feeds)
    bundle = model.bundle
    if trust_source and not bundle.trusted_source:
        bundle = copy.copy(bundle)
        bundle.trusted_source = True
    spec = bundle_reference(bundle)
    module = spec.module.eval()
    output = output or model.outputs[0].name
    if output not in spec.outputs:
        raise ToolkitError(f"unknown output {output!r}; the model gives {', '.join(spec.outputs)}.")
    position = list(spec.outputs).index(output)
    names, tokens = attributed_inputs(model, arrays, inputs)
    if len([n for n in names if n in tokens]) > 1 or (set(names) & set(tokens) and len(names) > 1):
        raise ToolkitError("gradient methods attribute one token ids input at a time, or float inputs only.")
    run, references = model.run_validated, None
    if similar_to is not None or (model.bundle.manifest.task == "embed" and target == "auto"):
        run, target, references = similarity(run, output, arrays, similar_to, target)
    scorer = Scorer(run, output)
    targets, score = scorer.answer(arrays, target)
    order = [t.name for t in spec.inputs]
    others = [n for n in order if n not in names]

    def forward(*values: Any) -> Any:
        given = dict(zip(names + others, values, strict=True))
        result = module(*(given[n] for n in order))
        result = result[position] if isinstance(result, (tuple, list)) else result
        result = result.reshape(len(result), -1)  # as Scorer flattens it
        if references is None:
            return result
        return torch.nn.functional.normalize(result.double(), dim=1) @ torch.from_numpy(references).T

    attributed = tuple(torch.from_numpy(arrays[n]) for n in names)
    extra = tuple(torch.from_numpy(arrays[n]) for n in others)
    chosen = torch.from_numpy(targets)
    if names[0] in tokens:
        layer = _embedding_of(module, forward, attributed, extra)
        baselines = tuple(torch.full_like(a, baseline_token) for a in attributed)
    else:
        layer, baselines = None, tuple(torch.full_like(a, baseline) for a in attributed)
    values, delta = _captum(method, forward, layer, attributed, baselines, chosen, extra, steps)
    with torch.no_grad():
        source = forward(*attributed, *extra).double().numpy()[np.arange(len(targets)), targets]
        start = forward(*baselines, *extra).double().numpy()[np.arange(len(targets)), targets]
    params: dict[str, Any] = {"baseline": baseline_token if layer is not None else baseline,
                              "source_gap": {"max_abs": float(np.abs(source - score).max()), "scale": float(np.abs(source).max())}}
    if method == "integrated-gradients":
        params["steps"] = steps
        change = np.abs(source - start)
        params["completeness"] = {"delta": delta.tolist(), "relative": (np.abs(delta) / np.maximum(change, 1e-12)).tolist()}
    if layer is not None:
        params["embedding"] = layer[0]
    return Explanation(method, output, targets, score, dict(zip(names, values, strict=True)), params, scorer.shape)


def _captum(method: str, forward: Any, layer: tuple[str, Any] | None, inputs: tuple[Any, ...], baselines: tuple[Any, ...],
            target: Any, extra: tuple[Any, ...], steps: int) -> tuple[list[np.ndarray], np.ndarray]:
    """(attributions per input as float64 numpy, token ids' summed over the embedding's width;
    integrated gradients' convergence delta per row, else zeros)."""
    from captum.attr import InputXGradient, IntegratedGradients, LayerGradientXActivation, LayerIntegratedGradients

    common = {"target": target, "additional_forward_args": extra or None}
    if method == "integrated-gradients":
        attributor = IntegratedGradients(forward) if layer is None else LayerIntegratedGradients(forward, layer[1])
        values, delta = attributor.attribute(inputs, baselines=baselines, n_steps=steps, return_convergence_delta=True, **common)
        delta = delta.detach().double().numpy()
    else:
        attributor = InputXGradient(forward) if layer is None else LayerGradientXActivation(forward, layer[1])
        inputs = inputs if layer is not None else tuple(v.clone().requires_grad_() for v in inputs)
        values, delta = attributor.attribute(inputs, **common), np.zeros(len(target))
    values = values if isinstance(values, (tuple, list)) else (values,)
    values = [v.detach().double().numpy() for v in values]
    return ([v.sum(axis=-1) for v in values] if layer is not None else values), delta


def _embedding_of(module: Any, forward: Any, ids: tuple[Any, ...], extra: tuple[Any, ...]) -> tuple[str, Any]:
    """(name, module) of the `nn.Embedding` that looks the token ids up: the first one whose forward
    reads exactly these ids in a run of the model."""
    import torch

    found: list[str] = []
    embeddings = {m: name for name, m in module.named_modules() if isinstance(m, torch.nn.Embedding)}

    def watch(layer: Any, args: tuple[Any, ...]) -> None:
        if args and args[0].shape == ids[0].shape and torch.equal(args[0], ids[0]) and not found:
            found.append(embeddings[layer])

    hooks = [m.register_forward_pre_hook(watch) for m in embeddings]
    try:
        with torch.no_grad():
            forward(*ids, *extra)
    finally:
        for hook in hooks:
            hook.remove()
    if not found:
        raise ToolkitError("no nn.Embedding of the source reads the token ids, so their embedding cannot carry the gradient; "
                           "explain the ids with a perturbation method (occlusion, shapley) instead.")
    return found[0], dict(module.named_modules())[found[0]]
