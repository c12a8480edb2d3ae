"""Stage `check`: parity of every variant of a bundle against its PyTorch reference.

Each variant runs over several seeds at two sizes of every dynamic dim (a dim that was meant to be
dynamic but got baked in fails), outputs are compared per the precision's tolerance profile, and
classifiers with a labelled eval set also report accuracy. Results are stored in the manifest. A
bundle's parts are checked first, as bundles of their own; a variant passes only if it passes in
every part too.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.bundle import Bundle
from toolkit.compile.tolerances import Tolerance, profile
from toolkit.errors import CheckFailed, ToolkitError
from toolkit.reference.run import reference_generator, run_reference
from toolkit.reference.source import bundle_reference, weights_sha256
from toolkit.runtime.model import Model
from toolkit.runtime.samples import make_feeds
from toolkit.spec import ModelSpec, cache_axes, shape_cases

__all__ = ["SEEDS", "check", "heldout_of", "judge_task", "judged", "reference_accuracy"]

SEEDS = (0, 1, 2)
_EVAL_CHUNK = 256
_QUANTIZED = ("int8", "int4")  # the precisions whose attributions check compares with fp32's
_DRIFT_ROWS = 4  # held-out rows explained for that: a few suffice to see a variant look elsewhere, each costs a run per window
_DECODER_CHUNK = 8


def check(
    bundle: str | Path | Bundle,
    *,
    variants: Sequence[str] | None = None,
    provider: str = "cpu",
    seeds: Sequence[int] = SEEDS,
    reference: ModelSpec | None = None,
    progress: Callable[[str], None] | None = None,
    evidence: dict[Any, Any] | None = None,
    trust_source: bool = False,
) -> dict[str, dict[str, Any]]:
    """Checks `variants` (default: all) of the bundle; returns and stores their parity records.
    `reference` is the bundle's PyTorch reference if the caller has built it already; `evidence`, a
    dict the caller keeps between checks of the same bundle and reference (a build), keeps the
    reference's outputs so that they are computed once, not for every variant. `trust_source` vouches for the code the manifest's source names (see `bundle_reference`)."""
    say = progress or (lambda _msg: None)
    bundle = Bundle.of(bundle, trust_source=trust_source)
    bundle.require_plain()  # checking rewrites graphs (localizing a failure marks every tensor): the key holder's, decrypted
    names = list(variants) if variants else list(bundle.manifest.variants)
    for name in names:
        bundle.variant(name)  # unknown names fail before any work
    if reference is None:
        say(f"building the PyTorch reference ({bundle.manifest.source.describe()})")
        reference = bundle_reference(bundle)
    parts = {}
    for part in bundle.parts():
        say(f"checking part {part.path.name}")
        parts[part.path.name] = check(part, variants=names, provider=provider, seeds=seeds,
                                      reference=reference.parts[part.path.name], progress=progress, evidence=evidence)
    key = (str(bundle.path.resolve()), id(reference), tuple(seeds))
    gathered = evidence.get(key) if evidence is not None else None
    if gathered is None:
        gathered = _Evidence.gather(bundle, reference, seeds, say)
        if evidence is not None:
            evidence[key] = gathered
    records = {}
    for name in names:
        say(f"checking variant {name} on {provider}")
        records[name] = _check_variant(bundle, name, provider, gathered)
        if parts:
            records[name]["parts"] = {part: {"passed": part_records[name]["passed"]} for part, part_records in parts.items()}
            records[name]["passed"] &= all(p["passed"] for p in records[name]["parts"].values())
    bundle.update(lambda manifest: [setattr(manifest.variants[name], "parity", record) for name, record in records.items()])
    return records


@dataclass
class _Evidence:
    """What every variant is compared with: the reference's outputs on each case, its accuracy on
    the eval set, its outputs on held-out inputs, and (decoders) its greedy continuations."""

    spec: ModelSpec
    cases: list[tuple[int, dict[str, int]]]  # (seed, sizes)
    feeds: list[dict[str, np.ndarray]]
    outputs: list[dict[str, np.ndarray]]
    evaluation: tuple[dict[str, np.ndarray], np.ndarray, float] | None
    heldout: tuple[str, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]
    greedy: _Greedy | None

    @classmethod
    def gather(cls, bundle: Bundle, spec: ModelSpec, seeds: Sequence[int], say: Callable[[str], None]) -> _Evidence:
        manifest = bundle.manifest
        expected = manifest.reference.get("weights_sha256")
        if expected and weights_sha256(spec.module) != expected:
            raise CheckFailed(
                f"the PyTorch reference of {bundle.path} ({manifest.source.describe()}) no longer has the "
                "weights it was exported with (its weights sha256 differs): the model code, its training cache or "
                "its factory changed. Re-export with `toolkit export ... --force`."
            )
        cases = [(seed, sizes) for sizes in shape_cases(manifest.dims) for seed in seeds]
        say(f"running the reference on {len(cases)} cases")
        feeds = [_case_feeds(spec, sizes, seed, generation=manifest.generation) for seed, sizes in cases]
        heldout = heldout_of(spec, manifest.dims)
        return cls(
            spec=spec, cases=cases, feeds=feeds, outputs=[run_reference(spec, case) for case in feeds],
            evaluation=reference_accuracy(spec) if spec.eval_data and spec.task == "classify" else None,
            heldout=heldout, greedy=_greedy_reference(bundle, spec, heldout) if manifest.generation else None,
        )


def _check_variant(bundle: Bundle, name: str, provider: str, evidence: _Evidence) -> dict[str, Any]:
    import onnxruntime
    import torch

    variant = bundle.variant(name)
    tolerance = profile(variant.precision)
    model = Model(bundle.path, variant=name, provider=provider)
    errors: list[str] = []
    outputs = _compare_cases(model, evidence, tolerance, errors)
    record: dict[str, Any] = {
        "passed": False,
        "precision": variant.precision,
        "tolerance": tolerance.to_json(),
        "runtime": f"onnxruntime {onnxruntime.__version__} {model.provider}",
        "reference": f"torch {torch.__version__} eager cpu",
        "cases": [{"seed": seed, "sizes": sizes} for seed, sizes in evidence.cases],
        "outputs": outputs,
        "errors": errors,
        "checked_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if evidence.evaluation is not None:
        record["accuracy"] = _accuracy_record(model, evidence.evaluation, tolerance)
    try:
        record["task_metric"] = _task_metric(evidence.spec.task, tolerance, evidence.heldout, model)
    except ToolkitError as exc:
        errors.append(f"held-out inputs: {exc}")
        record["task_metric"] = None
    if variant.precision in _QUANTIZED and "fp32" in bundle.manifest.variants and evidence.spec.task != "generate":
        record["attribution_drift"] = _attribution_drift(bundle, model, evidence)
    if evidence.greedy is not None:
        from toolkit.runtime.generate import Generator

        agreement = _greedy(lambda: Generator(model, cache="growing"), evidence.greedy, tolerance, errors, "")
        if agreement is not None:
            record["greedy"] = agreement
        if model.provider == "cpu":  # a Generator opened on the bundle decodes over the in-place cache where it applies
            model.close()  # the variant's graph has run all it runs here: one session's weights in memory at a time
            try:
                inplace = Generator(model, cache="inplace")
            except ToolkitError as exc:
                record["greedy_inplace"] = {"not_applied": str(exc)}
            else:
                agreement = _greedy(lambda: inplace, evidence.greedy, tolerance, errors, " over the in-place cache")
                if agreement is not None:
                    record["greedy_inplace"] = agreement
    record["passed"] = (not errors and all(s["passed"] for s in outputs.values())
                        and record.get("accuracy", {"passed": True})["passed"]
                        and (record["task_metric"] is None or record["task_metric"]["passed"]))
    return record


def _attribution_drift(bundle: Bundle, model: Model, evidence: _Evidence) -> dict[str, Any]:
    """Whether a quantized variant looks at the evidence fp32 does: occlusion's attributions of both,
    for fp32's answers on the first held-out rows, and their rank correlation (reported, not gated:
    toolkit.attribution.drift)."""
    from toolkit.attribution.drift import compare

    _, chunks, _ = evidence.heldout
    feeds = {name: value[:_DRIFT_ROWS] for name, value in chunks[0].items()}
    try:
        result = compare({"fp32": Model(bundle.path, variant="fp32", provider=model.provider), model.variant: model}, feeds,
                         method="occlusion")
    except ToolkitError as exc:
        return {"not_applied": str(exc)}
    row = result["variants"][model.variant]
    return {"method": "occlusion", "rows": len(row["per_row"]), "spearman": row["spearman"], "per_row": row["per_row"],
            "same_answer": row["same_answer"]}


def _greedy(generator: Callable[[], Any], greedy: _Greedy, tolerance: Tolerance, errors: list[str], where: str) -> dict[str, Any] | None:
    """The greedy tokens' agreement with the reference's (None if generating failed); what no near-tie
    explains goes to `errors`."""
    from toolkit.runtime.generate import greedy_tokens, token_agreement

    try:
        got = greedy_tokens(generator(), greedy.prompts, greedy.tokens.shape[1])
    except ToolkitError as exc:  # a later step's shapes can fail where the checked cases passed
        errors.append(f"greedy generation{where}: {exc}")
        return None
    errors.extend(f"{e} ({where.strip()})" if where else e for e in greedy.unexplained(got, tolerance))
    return token_agreement(got, greedy.tokens)


def _compare_cases(model: Model, evidence: _Evidence, tolerance: Tolerance, errors: list[str]) -> dict[str, dict[str, Any]]:
    """Per output: the largest absolute and relative error over every case, and whether each was allowed."""
    outputs = {o: {"max_abs_err": 0.0, "max_rel_err": 0.0, "scale": 0.0, "passed": True} for o in evidence.spec.outputs}
    for (seed, sizes), feeds, expected in zip(evidence.cases, evidence.feeds, evidence.outputs, strict=True):
        try:
            got = model.run(model.cast(feeds))
        except ToolkitError as exc:  # e.g. a dim that was baked in fails at its other size
            errors.append(f"seed {seed}, sizes {sizes}: {exc}")
            continue
        for out_name, want in expected.items():
            stats = outputs[out_name]
            have = got[out_name]
            if have.shape != want.shape:
                errors.append(f"seed {seed}, sizes {sizes}: output {out_name!r} has shape {have.shape}, the reference {want.shape}")
                stats["passed"] = False
                continue
            err = float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64)), initial=0.0))
            err = err if np.isfinite(err) else float("inf")  # NaN/Inf in the output fails
            scale = float(np.max(np.abs(want), initial=0.0))
            stats["max_abs_err"] = max(stats["max_abs_err"], err)
            stats["max_rel_err"] = max(stats["max_rel_err"], err / scale if scale > 0 else (0.0 if err == 0 else float("inf")))
            stats["scale"] = max(stats["scale"], scale)
            stats["passed"] &= tolerance.allows(err, scale)
    return outputs


def _accuracy_record(model: Model, evaluation: tuple[dict[str, np.ndarray], np.ndarray, float], tolerance: Tolerance) -> dict[str, Any]:
    feeds, labels, reference_accuracy = evaluation
    accuracy = _accuracy(lambda chunk: next(iter(model.run(model.cast(chunk)).values())), feeds, labels)
    drop = reference_accuracy - accuracy
    return {"dataset": f"eval set, {len(labels)} rows", "reference": reference_accuracy, "variant": accuracy, "drop": drop,
            "passed": drop <= tolerance.max_accuracy_drop}


_GREEDY_PROMPTS, _GREEDY_PROMPT_TOKENS, _GREEDY_NEW_TOKENS = 4, 16, 32


@dataclass
class _Greedy:
    """The reference's greedy continuation of a left-padded batch of prompts, with, per row and
    step, how far its chosen token led the runner-up in the logits and the logits' scale."""

    prompts: list[Any]  # token ids, or a speech model's feature arrays
    tokens: np.ndarray  # (rows, steps)
    leads: np.ndarray  # (rows, steps)
    scales: np.ndarray  # (rows, steps): max |logit|

    def unexplained(self, got: np.ndarray, tolerance: Tolerance) -> list[str]:
        """Where a variant judged elementwise (fp32, fp16) first chose another token than the
        reference, that is allowed only at a near-tie: the reference's lead no more than two logits
        each off by the tolerance could overturn. int8 decoders are judged by their task metric, and
        their agreement is reported."""
        if tolerance.rel is None:
            return []
        errors = []
        for row, (mine, theirs) in enumerate(zip(got, self.tokens, strict=True)):
            differ = np.flatnonzero(mine[: len(theirs)] != theirs[: len(mine)])
            if not len(differ):
                continue
            step = int(differ[0])
            lead, allowed = float(self.leads[row, step]), 2 * (tolerance.atol + tolerance.rel * float(self.scales[row, step]))
            if lead > allowed:
                errors.append(f"greedy generation: prompt {row + 1} of {len(self.prompts)} chose token {int(mine[step])} at step "
                              f"{step + 1} where the reference chose {int(theirs[step])}, which led by {lead:.3g} in the logits: "
                              f"more than {tolerance.precision} rounding explains ({allowed:.3g})")
        return errors


def _greedy_reference(bundle: Bundle, spec: ModelSpec, heldout) -> _Greedy:
    """Prompts from the held-out inputs (of different lengths, so the batch is padded) and the
    PyTorch reference's greedy continuation of them, with the logits each token was chosen from."""
    from toolkit.runtime.generate import greedy_tokens

    feeds = heldout[1][0]
    rows = range(min(_GREEDY_PROMPTS, len(feeds["input_ids"])))
    if "encoder" in bundle.manifest.generation:  # an encoder-decoder: its held-out sources, as they are
        sources = spec.parts[bundle.manifest.generation["encoder"]].sample_data()
        prompts = [sources["input_features"][i] if "input_features" in sources else
                   sources["source_ids"][i][sources["source_mask"][i] == 1].tolist() for i in rows]
    else:
        prompts = [feeds["input_ids"][i, : _GREEDY_PROMPT_TOKENS - 3 * i].tolist() for i in rows]
    logits_name = spec.outputs[0]
    chosen_from: list[np.ndarray] = []  # per step, (rows, vocabulary): the last position's logits

    def observe(outputs: dict[str, np.ndarray]) -> None:
        chosen_from.append(outputs[logits_name][:, -1].astype(np.float64))

    tokens = greedy_tokens(reference_generator(bundle.path, spec, observe=observe), prompts, _GREEDY_NEW_TOKENS)
    steps = np.stack(chosen_from[: tokens.shape[1]], axis=1)  # (rows, steps, vocabulary)
    top_two = np.partition(steps, -2, axis=-1)[..., -2:]
    return _Greedy(prompts, tokens, top_two[..., 1] - top_two[..., 0], np.abs(steps).max(axis=-1))


_HELDOUT_ROWS = 256
_HELDOUT_SEED = 20_000  # far from the check seeds and from calibration seeds


def heldout_of(spec: ModelSpec, dims) -> tuple[str, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """(description, feed chunks, the reference's task-metric outputs per chunk): the eval set when the
    model has one, otherwise sample inputs at the export sizes."""
    if spec.eval_data is not None:
        feeds, labels = spec.eval_data()
        description = f"eval set, {len(labels)} rows"
    elif spec.sample_data is not None:
        feeds = spec.sample_data()
        description = f"{len(next(iter(feeds.values())))} real inputs"
    else:
        rows = _HELDOUT_ROWS if spec.task != "generate" else _HELDOUT_ROWS // 4
        feeds = make_feeds(spec.inputs, {d.name: (rows if d.name == "batch" else d.export) for d in dims}, _HELDOUT_SEED)
        description = f"{rows} sample rows"
    # a decoder's logits are rows × seq × vocabulary floats: a few rows at a time bound the memory they take
    size = _EVAL_CHUNK if spec.task != "generate" else _DECODER_CHUNK
    batched = {t.name for t in spec.inputs if t.shape and t.shape[0] == "batch"} & set(feeds)  # others (a static cache's slots) go whole
    total = len(feeds[next(iter(batched))]) if batched else 1
    chunks = [{k: v[i : i + size] if k in batched else v for k, v in feeds.items()} for i in range(0, total, size)]
    return description, chunks, [judged(spec.task, run_reference(spec, chunk)) for chunk in chunks]


def judged(task: str, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the task metric compares: the predicted class or next token (not a decoder's logits over
    its whole vocabulary at every position, nor its KV cache, which the elementwise check judges)."""
    if task == "generate":
        name = next(iter(outputs))
        return {name: outputs[name].argmax(-1)}
    if task == "classify":
        return {name: value.argmax(-1) for name, value in outputs.items()}
    return outputs


def _task_metric(task: str, tolerance, heldout, model: Model) -> dict[str, Any]:
    description, chunks, references = heldout
    per_token = _per_token_outputs(model.bundle.manifest) if task == "classify" else set()
    got = [judged(task, model.run(model.cast(chunk))) for chunk in chunks]
    return judge_task(task, tolerance, heldout, got, per_token)


def judge_task(task: str, tolerance: Tolerance, heldout, got: Sequence[dict[str, np.ndarray]], per_token: set[str] = frozenset()) -> dict[str, Any]:
    """The task metric of `got` (per held-out chunk, what `judged` keeps of a model's outputs)
    against `heldout`'s reference outputs, and whether `tolerance` lets it pass."""
    description, chunks, references = heldout
    pairs = [_real_tokens(g[name], r[name], chunk["attention_mask"] if name in per_token else None)
             for chunk, r, g in zip(chunks, references, got, strict=True) for name in r]
    if task in ("classify", "generate"):
        agree = np.concatenate([(a == b).ravel() for a, b in pairs])
        metric = "top1_agreement" if task == "classify" else "next_token_agreement"
        value, threshold = float(agree.mean()), (tolerance.min_top1_agreement if task == "classify" else tolerance.min_next_token_agreement)
    elif task == "embed":
        metric = "min_cosine"
        value = min(float(_cosine(a.reshape(len(a), -1), b.reshape(len(b), -1)).min()) for a, b in pairs)
        threshold = tolerance.min_cosine
    else:
        metric = "max_score_rel"
        value = max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)) for a, b in pairs)
        threshold = tolerance.max_score_rel
    if not np.isfinite(value):
        passed = False
    elif threshold is None:
        passed = True
    else:
        passed = value <= threshold if metric == "max_score_rel" else value >= threshold
    return {"metric": metric, "value": value, "threshold": threshold, "inputs": description, "passed": passed}


def _per_token_outputs(manifest: Any) -> set[str]:
    """Outputs with a value per token: their axis 1 is the attention mask's (a token classifier's or
    masked LM's logits, ("batch", "seq", classes))."""
    axes = {t.shape[1] for t in manifest.inputs if t.kind == "mask" and len(t.shape) == 2 and isinstance(t.shape[1], str)}
    return {t.name for t in manifest.outputs if len(t.shape) > 2 and t.shape[1] in axes}


def _real_tokens(got: np.ndarray, expected: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """A per-token output's top-1 judged at the tokens the attention mask keeps: what a model says
    at padding is read by nobody."""
    if mask is None:
        return got, expected
    keep = mask.astype(bool)
    return got[keep], expected[keep]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1), 1.0)


def _case_feeds(spec: ModelSpec, sizes: dict[str, int], seed: int, *, generation: dict[str, Any] | None) -> dict[str, np.ndarray]:
    """Sample feeds for one case. A decoder step's caches are the reference's own, from a first step
    over the cached part of a sample sequence, and an encoder-decoder's memory is its reference
    encoder's output on a sample source: random caches are states no generation reaches, on which a
    trained model amplifies rounding (fp16) far beyond what decoding sees.

    Cached and new axes pair up in the mask axis ("past+seq"): the first step takes the first `past`
    tokens, the checked step the rest."""
    if spec.case_feeds is not None:
        return spec.case_feeds(sizes, seed)
    pairs = cache_axes(spec.inputs)
    fixed = {}
    if generation and "encoder" in generation:
        encoder = spec.parts[generation["encoder"]]
        sources = make_feeds(encoder.inputs, sizes, seed)
        names = {t.name for t in spec.inputs}
        fixed = {name: value for name, value in (sources | run_reference(encoder, sources)).items() if name in names}
    if not generation or not any(sizes[cached] for cached, _ in pairs):
        return make_feeds(spec.inputs, sizes, seed) | fixed
    whole = make_feeds(spec.inputs, {**sizes, **{new: sizes[c] + sizes[new] for c, new in pairs}, **{c: 0 for c, _ in pairs}}, seed) | fixed
    first, step = dict(whole), dict(whole)
    for t in spec.inputs:
        axis = t.shape[1] if len(t.shape) > 1 else None
        for cached, new in pairs:
            if axis == new:
                first[t.name], step[t.name] = whole[t.name][:, : sizes[cached]], whole[t.name][:, sizes[cached] :]
            elif axis == f"{cached}+{new}":
                first[t.name] = whole[t.name][:, : sizes[cached]]
    cache = run_reference(spec, first)
    return step | {name: cache["present_" + name.removeprefix("past_")] for name in whole if name.startswith("past_")}


def reference_accuracy(spec: ModelSpec) -> tuple[dict[str, np.ndarray], np.ndarray, float]:
    feeds, labels = spec.eval_data()
    accuracy = _accuracy(lambda chunk: next(iter(run_reference(spec, chunk).values())), feeds, labels)
    return feeds, labels, accuracy


def _accuracy(predict: Callable[[dict[str, np.ndarray]], np.ndarray], feeds: dict[str, np.ndarray], labels: np.ndarray) -> float:
    correct = 0
    for start in range(0, len(labels), _EVAL_CHUNK):
        chunk = {k: v[start : start + _EVAL_CHUNK] for k, v in feeds.items()}
        correct += int((predict(chunk).argmax(axis=-1) == labels[start : start + _EVAL_CHUNK]).sum())
    return correct / len(labels)


