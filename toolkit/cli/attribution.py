"""`toolkit explain`: which inputs drove a model's answer, from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.text import Text

from toolkit.attribution import GRADIENT_METHODS, METHODS, token_inputs
from toolkit.attribution.pictures import shaded
from toolkit.cli.commands import (
    KeyOption,
    Provider,
    TrustSourceOption,
    _choices,
    _command,
    _csv_list,
    _given_inputs,
    _int_list,
    err,
    out,
)
from toolkit.errors import ToolkitError

Method = _choices("AttributionMethod", [*METHODS, "rollout", *GRADIENT_METHODS])


@_command
def explain(
    bundle_dir: Path = typer.Argument(..., metavar="DIR", help="Bundle of a classifier, regressor or any model with a batch axis, "
                                      "or of a decoder (with --prompt)."),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="A decoder: the text to continue; each generated token is "
                                      "attributed to the tokens before it (occlusion, shapley or kernel-shap)."),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", "-n", help="A decoder: tokens generated (greedily) and explained."),
    inputs: list[str] | None = typer.Option(None, "--input", "-i", help="NAME=FILE.npy (repeatable); a single-input model also takes FILE.npy."),
    example: bool = typer.Option(False, "--example", help="Explain sample inputs drawn from the manifest instead of files."),
    seed: int = typer.Option(0, help="Seed for --example, and for the orderings Shapley sampling draws."),
    method: Method = typer.Option(Method.occlusion, help="occlusion: slide a window, credit each element with the score's average drop; "
                                  "shapley: Shapley value sampling over feature groups (--patch squares, or each element); kernel-shap: KernelSHAP's "
                                  "linear fit over sampled coalitions of them; rollout: a transformer "
                                  "encoder's attention through its layers, read from the graph; integrated-gradients, "
                                  "input-x-gradient: Captum on the bundle's PyTorch source (needs torch; token ids through their embedding)."),
    target: str = typer.Option("auto", help="The class (output index) to explain, or auto: each row's top one; for an output "
                               "with several axes past the batch axis, one index per axis (a token classifier's POSITION,CLASS)."),
    window: str | None = typer.Option(None, help="occlusion: the window's size per axis past the batch axis, comma-separated "
                                      "(an image's 1,4,4; default: 4 on the last two axes, 1 before them, or 1 for a vector)."),
    strides: str | None = typer.Option(None, help="occlusion: the window's step per axis (default: the window)."),
    patch: int | None = typer.Option(None, help="shapley, kernel-shap: features are PATCH×PATCH squares of an image (default: each element)."),
    samples: int = typer.Option(25, help="shapley: orderings of the features sampled; kernel-shap: coalitions (default 25 there too; more "
                                "than the features fits better)."),
    steps: int = typer.Option(50, help="integrated-gradients: points on the path from the baseline to the input."),
    query: str = typer.Option("first", help="rollout: the attention flowing into the first token (a classifier reading a CLS token) or the mean "
                              "over the tokens (mean pooling)."),
    similar_to: Path | None = typer.Option(None, "--similar-to", metavar="FILE.npy", help="An embedder: explain the cosine "
                                           "similarity to this vector (one, or one per row) instead of to each row's own embedding."),
    variant: str | None = typer.Option(None, help="Variant to explain (default fp32)."),
    compare: str | None = typer.Option(None, "--compare", metavar="V1,V2,...", help="Explain these variants for the first one's "
                                       "answer and give each later one's rank correlation (Spearman) with it: whether a cheaper "
                                       "variant looks at the same evidence."),
    provider: Provider = typer.Option(Provider.auto, help="Execution provider."),
    save: Path | None = typer.Option(None, "--save", help="Write each input's attributions to DIR/NAME.npy."),
    plot: Path | None = typer.Option(None, "--plot", help="Draw them: F.png (a heat map over an image, bars for a vector's "
                                     "strongest features) or F.html (tokens shaded; the bundle's tokenizer shows their text)."),
    top: int = typer.Option(5, help="Elements printed per row, most attributed first."),
    trust_source: TrustSourceOption = False,
    key: KeyOption = None,
) -> None:
    """Attribute a model's answer to its inputs: which elements of each float input (or which tokens)
    moved the target's score, and by how much. occlusion, shapley and kernel-shap run on the ONNX session itself
    (no torch, no model code); the gradient methods on the bundle's PyTorch source, with the
    completeness of integrated gradients and the source's score against the variant's reported."""
    from toolkit import explain as attribute
    from toolkit.runtime.model import load

    model = load(bundle_dir, variant=variant, provider=provider.value, key=key)
    if model.bundle.manifest.generation or prompt is not None:
        _explain_generation(model, prompt, max_new_tokens, method.value, samples, seed, plot)
        return
    feeds = _given_inputs(model, inputs, example, seed)
    indices = [] if target == "auto" else _int_list(target, "--target")
    chosen: Any = "auto" if not indices else indices[0] if len(indices) == 1 else tuple(indices)
    params: dict[str, Any] = {}
    if method.value == "occlusion":
        params.update({"window": _int_list(window, "--window")} if window else {})
        params.update({"strides": _int_list(strides, "--strides")} if strides else {})
    elif method.value == "rollout":
        params["query"] = query
    elif method.value in ("shapley", "kernel-shap"):
        params.update({"samples": samples, "seed": seed, **({"patch": patch} if patch else {})})
    else:
        params.update({"trust_source": trust_source, **({"steps": steps} if method.value == "integrated-gradients" else {})})
    if similar_to is not None:
        params["similar_to"] = np.load(similar_to, allow_pickle=False)
    if compare:
        if method.value in GRADIENT_METHODS:
            raise ToolkitError(f"--compare needs a method that runs on each variant (occlusion, shapley, kernel-shap); {method.value} runs on "
                               "the PyTorch source, the same for every variant.")
        _compare(bundle_dir, _csv_list(compare, "--compare"), feeds, provider.value, key, method=method.value, **params)
        return
    err.print(f"explaining {model.name} variant {model.variant} on {model.provider} with {method.value}")
    explanation = attribute(model, feeds, method=method.value, target=chosen, **params)
    tokens = token_inputs(model)
    token_text = _token_text(model.bundle) if set(explanation.attributions) & set(tokens) else None  # read once: a sealed bundle decrypts it
    for name, values in explanation.attributions.items():
        text = token_text if name in tokens else None
        for row, score in enumerate(explanation.score):
            if text is not None:
                out.print(Text(f"row {row}: {explanation.output}{explanation.where(row)} = {score:.4g}; ") +
                          shaded([text(t) for t in feeds[name][row].tolist()], values[row]))
                continue
            flat = values[row].ravel()
            order = np.argsort(-np.abs(flat))[:top]
            where = ", ".join(f"{[int(a) for a in np.unravel_index(i, values.shape[1:])]}: {flat[i]:+.4g}" for i in order)
            out.print(f"row {row}: {explanation.output}{explanation.where(row)} = {score:.4g}; {name} most attributed: {where}")
        if save is not None:
            save.mkdir(parents=True, exist_ok=True)
            np.save(save / f"{name}.npy", values)
            out.print(f"saved {save / name}.npy ({values.dtype} {list(values.shape)})")
    if method.value in GRADIENT_METHODS:
        _report_gradients(explanation, model)
    if plot is not None:
        from toolkit.attribution.pictures import plot as draw

        out.print(f"drew {draw(explanation, model.validate(feeds), plot, token_text=token_text)}")


def _explain_generation(model: Any, prompt: str | None, max_new_tokens: int, method: str, samples: int, seed: int,
                        plot: Path | None) -> None:
    from toolkit.attribution.generation import explain_generation
    from toolkit.attribution.pictures import plot_generation

    if not model.bundle.manifest.generation or prompt is None:
        raise ToolkitError(f"--prompt is for decoders; {model.name} is explained from --input or --example." if prompt is not None else
                           f"{model.name} is a decoder: give --prompt TEXT, and each generated token is attributed to the tokens before it.")
    if method not in ("occlusion", "shapley", "kernel-shap"):
        raise ToolkitError(f"generated tokens are explained by occlusion, shapley or kernel-shap on the ONNX session, not {method}.")
    err.print(f"explaining {model.name} variant {model.variant}'s next {max_new_tokens} tokens with {method}")
    explained = explain_generation(model, prompt, max_new_tokens=max_new_tokens, method=method,
                                   **({"samples": samples, "seed": seed} if method != "occlusion" else {}))
    pieces, start = explained.texts(), len(explained.prompt)
    out.print("generated: " + repr("".join(pieces[start:])))
    for k in range(len(explained.tokens)):
        length = explained.context(k)
        out.print(Text(f"{pieces[start + k]!r:>8} log p {explained.logprob[k]:6.2f} ← ") + shaded(pieces[:length], explained.attributions[k, :length]))
    if plot is not None:
        out.print(f"drew {plot_generation(explained, plot)}")


def _report_gradients(explanation: Any, model: Any) -> None:
    """Completeness and the source against the variant: how far the gradients explain what runs."""
    from toolkit.compile.tolerances import profile

    params = explanation.params
    if "completeness" in params:
        worst = max(params["completeness"]["relative"])
        out.print(f"completeness: attributions sum to f(x) - f(baseline) within {worst:.2%} (worst row; raise --steps to tighten)")
    gap, scale = params["source_gap"]["max_abs"], params["source_gap"]["scale"]
    precision = model.bundle.manifest.variants[model.variant].precision
    tolerance = profile(precision)
    if tolerance.rel is not None and tolerance.allows(gap, scale):
        out.print(f"source against {model.variant}: target scores within {gap:.3g} (parity tolerance {tolerance.atol + tolerance.rel * scale:.3g})")
    else:
        err.print(f"[yellow]the gradients explain the PyTorch source: its target scores differ from {model.variant}'s by up to "
                  f"{gap:.3g} (scale {scale:.3g}); check the variant's evidence with a perturbation method[/yellow]")


def _compare(bundle_dir: Path, variants: list[str], feeds: dict[str, Any], provider: str, key: Any, **options: Any) -> None:
    from toolkit.attribution.drift import compare
    from toolkit.runtime.model import load

    if len(variants) < 2:
        raise ToolkitError(f"--compare takes two variants or more, comma-separated (fp32,int8), got {variants}.")
    models = {name: load(bundle_dir, variant=name, provider=provider, key=key) for name in variants}
    err.print(f"explaining {', '.join(variants)} with {options['method']} for {variants[0]}'s answers")
    result = compare(models, feeds, **options)
    for name, row in result["variants"].items():
        same = "" if row["same_answer"] is None else f"; same answer on {row['same_answer']:.0%} of the rows"
        out.print(f"{name} against {result['reference']}: Spearman {row['spearman']:.3f} (per row: "
                  f"{', '.join(f'{v:.3f}' for v in row['per_row'])}){same}")


def _token_text(bundle: Any) -> Any:
    """A token id's text, where the bundle carries its tokenizer (else the id is shown)."""
    from toolkit.runtime.tokenizer import HF_TOKENIZER_FILE, HFTokenizer

    if HF_TOKENIZER_FILE not in bundle.manifest.assets:
        return None
    tokenizer = HFTokenizer(bundle.asset(HF_TOKENIZER_FILE), ())
    return lambda token: tokenizer.decode([token])
