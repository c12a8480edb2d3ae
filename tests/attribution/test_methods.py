"""The perturbation methods on the ONNX session, measured on the trained digits models: the same
values as Captum's implementation of each method on the PyTorch model (same windows, same
orderings), Shapley credits that sum to f(x) - f(baseline), and attributions that mean something:
deleting the most attributed patches first drops the prediction faster than deleting random ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toolkit.attribution import explain, patch_mask
from toolkit.bundle import Bundle
from toolkit.errors import ToolkitError
from toolkit.reference.source import bundle_reference
from toolkit.runtime.model import Model


@pytest.fixture(scope="module")
def digits(exported):
    """The trained digits CNN (the default preset: trained on scikit-learn's digits), its PyTorch
    reference, and four held-out images."""
    path = exported("cnn", "default")
    spec = bundle_reference(Bundle.open(path))
    feeds, _ = spec.eval_data()
    return Model(path, provider="cpu"), spec.module.eval(), feeds["image"][:4]


def test_occlusion_gives_captums_values(digits):
    from captum.attr import Occlusion

    model, module, images = digits
    ours = explain(model, {"image": images}, method="occlusion", window=(1, 6, 6), strides=(1, 4, 4))
    theirs = Occlusion(module).attribute(torch.from_numpy(images), sliding_window_shapes=(1, 6, 6), strides=(1, 4, 4),
                                         target=torch.from_numpy(ours.target), baselines=0.0)
    np.testing.assert_allclose(ours.attributions["image"], theirs.numpy(), rtol=1e-3, atol=1e-4 * np.abs(theirs.numpy()).max())


def test_shapley_sampling_gives_captums_values_for_the_same_orderings(digits):
    from captum.attr import ShapleyValueSampling

    model, module, images = digits
    mask = patch_mask(images.shape[1:], 7)  # 16 patches
    torch.manual_seed(0)
    orderings = [torch.randperm(16).tolist() for _ in range(6)]
    ours = explain(model, {"image": images[:2]}, method="shapley", feature_mask=mask, permutations=orderings)
    torch.manual_seed(0)  # Captum draws the same orderings
    theirs = ShapleyValueSampling(module).attribute(torch.from_numpy(images[:2]), target=torch.from_numpy(ours.target), baselines=0.0,
                                                    feature_mask=torch.from_numpy(mask)[None], n_samples=6)
    np.testing.assert_allclose(ours.attributions["image"], theirs.numpy(), rtol=1e-3, atol=1e-4 * np.abs(theirs.numpy()).max())


def test_shapley_credits_sum_to_the_change_from_the_baseline(digits):
    model, _, images = digits
    explanation = explain(model, {"image": images}, method="shapley", patch=7, samples=3)
    at_baseline = model.run({"image": np.zeros_like(images)})["logits"][np.arange(len(images)), explanation.target]
    per_patch = explanation.attributions["image"][:, 0, ::7, ::7].sum(axis=(1, 2))  # one element per patch carries its credit
    np.testing.assert_allclose(per_patch, explanation.score - at_baseline, rtol=1e-4, atol=1e-4)


def test_deleting_the_most_attributed_patches_first_drops_the_prediction_faster_than_random(digits):
    """Faithfulness (the deletion curve): the area under the target's probability as 4×4 patches go
    to the baseline, most attributed first, against the mean area of random orders."""
    model, _, images = digits
    explanation = explain(model, {"image": images}, method="occlusion", window=(1, 4, 4), strides=(1, 4, 4))
    rng = np.random.default_rng(0)

    def area(row: int, order: np.ndarray) -> float:
        mask = patch_mask(images.shape[1:], 4)
        steps = [images[row].copy()]
        for patch in order:
            steps.append(np.where(mask == patch, 0.0, steps[-1]).astype(np.float32))
        logits = model.run({"image": np.stack(steps)})["logits"]
        probability = np.exp(logits - logits.max(1, keepdims=True))
        probability /= probability.sum(1, keepdims=True)
        return float(probability[:, explanation.target[row]].mean())

    for row in range(len(images)):
        credit = explanation.attributions["image"][row, 0, ::4, ::4].ravel()
        attributed = area(row, np.argsort(-credit))
        random = np.mean([area(row, rng.permutation(len(credit))) for _ in range(5)])
        assert attributed < 0.6 * random, (row, attributed, random)


def test_bad_requests_name_what_is_wrong(digits):
    model, _, images = digits
    with pytest.raises(ToolkitError, match="unknown method 'lime'; choose occlusion, shapley"):
        explain(model, {"image": images}, method="lime")
    with pytest.raises(ToolkitError, match=r"occlusion window \[4, 4\]: give one size per axis .* the input is \[1, 28, 28\]"):
        explain(model, {"image": images}, method="occlusion", window=(4, 4))
    with pytest.raises(ToolkitError, match=r"target 10: give an index of output 'logits' in \[0, 10\)"):
        explain(model, {"image": images}, method="occlusion", window=(1, 4, 4), target=10)
    with pytest.raises(ToolkitError, match=r"target \[3, 1\]: give one index per axis of output 'logits' past its batch axis"):
        explain(model, {"image": images}, method="occlusion", target=(3, 1))
    with pytest.raises(ToolkitError, match="similar_to has 3 values; output 'logits' has 10"):
        explain(model, {"image": images}, similar_to=np.ones(3))
    default = explain(model, {"image": images[:1]}, method="occlusion")  # a window of 4×4 squares when none is given
    assert default.attributions["image"].shape == (1, 1, 28, 28) and default.params == {}


def test_the_command_line_explains_and_saves_the_attributions(digits, exported, cli, tmp_path):
    model, _, images = digits
    np.save(tmp_path / "digits.npy", images[:2])
    result = cli("explain", exported("cnn", "default"), "--input", tmp_path / "digits.npy", "--window", "1,4,4", "--save", tmp_path / "out")
    assert result.exit_code == 0, result.output
    saved = np.load(tmp_path / "out" / "image.npy")
    expected = explain(model, {"image": images[:2]}, method="occlusion", window=(1, 4, 4)).attributions["image"]
    np.testing.assert_allclose(saved, expected, rtol=1e-6)
    assert "row 1: logits[" in result.output and "image most attributed: [0, " in result.output
    refused = cli("explain", exported("cnn", "default"), "--example", "--window", "4,4")
    assert refused.exit_code == 2 and "the input is [1, 28, 28]" in refused.output


@pytest.fixture(scope="module")
def encoder(exported):
    """The zoo's text classifier (token ids and an attention mask), its PyTorch reference, two padded rows."""
    from toolkit.runtime.samples import make_feeds

    path = exported("encoder")
    model = Model(path, provider="cpu")
    return model, bundle_reference(Bundle.open(path)).module.eval(), make_feeds(model.inputs, {"batch": 2, "seq": 9}, 3)


@pytest.mark.parametrize("method", ["occlusion", "shapley"])
def test_tokens_are_removed_through_the_attention_mask(encoder, method):
    """A token is removed as the model removes padding, through its attention mask: the same values as
    Captum's method over a token-presence input that multiplies the mask, baseline 0."""
    from captum.attr import Occlusion, ShapleyValueSampling

    model, module, feeds = encoder
    torch.manual_seed(0)
    orderings = [torch.randperm(9).tolist() for _ in range(4)]
    options = {"permutations": orderings} if method == "shapley" else {}
    ours = explain(model, feeds, method=method, **options)
    assert list(ours.attributions) == ["input_ids"]
    ids, mask = torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])

    def forward(presence, ids, mask):
        return module(ids, (mask * presence).long())

    presence = torch.ones(ids.shape)
    common = {"target": torch.from_numpy(ours.target), "baselines": 0.0, "additional_forward_args": (ids, mask)}
    torch.manual_seed(0)
    theirs = (Occlusion(forward).attribute(presence, sliding_window_shapes=(1,), **common) if method == "occlusion" else
              ShapleyValueSampling(forward).attribute(presence, n_samples=4, **common)).numpy()
    np.testing.assert_allclose(ours.attributions["input_ids"], theirs, rtol=1e-3, atol=1e-4 * np.abs(theirs).max())
    padded = feeds["attention_mask"] == 0
    assert padded.any() and np.all(ours.attributions["input_ids"][padded] == 0)  # a token already masked out moves nothing


def test_pictures_a_heat_map_bars_and_shaded_tokens(digits, encoder, exported, tmp_path, cli):
    from toolkit.attribution.pictures import plot

    model, _, images = digits
    drawn = plot(explain(model, {"image": images[:2]}, method="occlusion", window=(1, 4, 4)), {"image": images[:2]}, tmp_path / "digits.png")
    assert drawn.read_bytes().startswith(b"\x89PNG") and drawn.stat().st_size > 5000
    text_model, _, feeds = encoder
    page = plot(explain(text_model, feeds), feeds, tmp_path / "tokens.html", token_text=lambda t: f"<{t}>").read_text()
    assert page.count("<span ") == feeds["input_ids"].size and "&lt;" in page  # every token, its text escaped
    assert "<script" not in page and "http" not in page  # nothing to run, nothing fetched
    with pytest.raises(ToolkitError, match="HTML shades tokens"):
        plot(explain(model, {"image": images[:1]}, method="occlusion", window=(1, 4, 4)), {"image": images[:1]}, tmp_path / "x.html")
    result = cli("explain", exported("mlp", "default"), "--example", "--plot", tmp_path / "bars.png")
    assert result.exit_code == 0 and (tmp_path / "bars.png").read_bytes().startswith(b"\x89PNG"), result.output


def _randomized(bundle, seed=0):
    """The bundle's fp32 variant with every weight's values shuffled: a model that answers by chance
    (the sanity check of Adebayo et al.: explanations of it must not look like the trained one's)."""
    import onnx
    from onnx import numpy_helper

    from toolkit.bundle import Bundle

    opened = Bundle.open(bundle)
    proto = onnx.load(str(opened.variant_path("fp32")))
    rng = np.random.default_rng(seed)
    for tensor in proto.graph.initializer:
        values = numpy_helper.to_array(tensor)
        if values.size > 16:
            tensor.CopyFrom(numpy_helper.from_array(rng.permutation(values.ravel()).reshape(values.shape), tensor.name))
    onnx.save(proto, bundle.parent / "randomized.onnx")
    opened.add_variant("randomized", bundle.parent / "randomized.onnx", recipe={"stage": "test", "options": {}, "parent": "fp32"},
                       precision="fp32")


@pytest.mark.slow  # it quantizes the CNN (int8-static) first
def test_a_quantized_variant_looks_at_the_evidence_a_randomized_one_does_not(with_variants, copy_of, cli):
    """Variant drift, with the sanity check as its yardstick: int8's attributions rank like fp32's far
    more than those of the same network with its weights shuffled."""
    from toolkit.attribution.drift import compare

    bundle = copy_of(with_variants("cnn", ("int8-static",), preset="default"))
    _randomized(bundle)
    models = {v: Model(bundle, variant=v, provider="cpu") for v in ("fp32", "int8-static", "randomized")}
    images = bundle_reference(Bundle.open(bundle)).eval_data()[0]["image"][:6]
    result = compare(models, {"image": images}, method="occlusion", window=(1, 4, 4), strides=(1, 2, 2))
    quantized, randomized = result["variants"]["int8-static"], result["variants"]["randomized"]
    assert quantized["same_answer"] > randomized["same_answer"]
    assert quantized["spearman"] > randomized["spearman"] + 0.3, result
    assert compare({"a": models["fp32"], "b": models["fp32"]}, {"image": images[:2]}, method="occlusion",
                   window=(1, 4, 4))["variants"]["b"]["spearman"] == pytest.approx(1.0)
    np.save(bundle.parent / "six.npy", images)
    shown = cli("explain", bundle, "--input", bundle.parent / "six.npy", "--compare", "fp32,int8-static", "--window", "1,4,4")
    assert shown.exit_code == 0 and "int8-static against fp32: Spearman 0." in shown.output, shown.output
    checked = cli("check", bundle, "--variant", "int8-static")  # check's report: the drift on the first held-out rows
    drift = Bundle.open(bundle).manifest.variants["int8-static"].parity["attribution_drift"]
    expected = compare({v: models[v] for v in ("fp32", "int8-static")}, {"image": images[:4]}, method="occlusion")
    assert drift["rows"] == 4 and drift["spearman"] == pytest.approx(expected["variants"]["int8-static"]["spearman"])
    assert "attribution drift" in checked.output and f"Spearman {drift['spearman']:.3f}" in checked.output


def test_rollout_reads_the_attention_transformers_computes(exported):
    """Attention rollout's maps are the graph's Softmax outputs: for a Hugging Face BERT they equal the
    attentions transformers returns, and the rollout is Abnar & Zuidema's over them."""
    import transformers

    from models.hf_heads import hf_model
    from toolkit.attribution.attention import attention_maps, rollout

    path = exported(f"hf:{hf_model('bert-sequence')}", None)
    model = Model(path, provider="cpu")
    feeds = {name: value[:2] for name, value in bundle_reference(Bundle.open(path, trust_source=True)).sample_data().items()}
    maps = attention_maps(model, model.validate(feeds))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(hf_model("bert-sequence"), attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = hf(**{k: torch.from_numpy(v) for k, v in feeds.items()}, output_attentions=True).attentions
    assert len(maps) == len(theirs) == hf.config.num_hidden_layers
    for ours, expected in zip(maps, theirs, strict=True):
        np.testing.assert_allclose(ours, expected.numpy(), atol=1e-5)
    flow = np.eye(maps[0].shape[-1])
    for layer in maps:
        mixed = 0.5 * layer[1].mean(axis=0) + 0.5 * np.eye(len(flow))
        flow = (mixed / mixed.sum(axis=-1, keepdims=True)) @ flow
    explained = explain(model, feeds, method="rollout")
    np.testing.assert_allclose(explained.attributions["input_ids"][1], flow[0] * feeds["attention_mask"][1], atol=1e-9)
    kept = feeds["attention_mask"].astype(bool)
    np.testing.assert_allclose(rollout(maps, feeds["attention_mask"], "first")[kept].sum(), kept.shape[0], rtol=1e-6)  # a distribution per row


def test_rollout_names_a_fused_variant_and_a_graph_without_attention(with_variants, digits):
    model = Model(with_variants("encoder", ("opt",)), variant="opt", provider="cpu")
    from toolkit.runtime.samples import make_feeds

    feeds = make_feeds(model.inputs, {"batch": 1, "seq": 5}, 0)
    with pytest.raises(ToolkitError, match="fuses attention into .*explain the unfused fp32 variant"):
        explain(model, feeds, method="rollout")
    with pytest.raises(ToolkitError, match="neither a float input nor token ids|token ids of a transformer encoder"):
        explain(digits[0], {"image": digits[2][:1]}, method="rollout")


def test_an_embedder_is_explained_by_the_similarity_of_its_embedding(exported):
    """Task embed: the score is the cosine similarity to the row's own embedding (what carries it), or
    to `similar_to` (why is this like that); occlusion's credit of a token is the similarity lost
    without it."""
    from models.hf_heads import hf_model

    model = Model(exported(f"hf:{hf_model('bert-embed')}", None), provider="cpu")
    feeds = {name: value[:2] for name, value in bundle_reference(Bundle.open(model.bundle.path, trust_source=True)).sample_data().items()}
    output = model.outputs[0].name
    own = explain(model, feeds, output=output)
    np.testing.assert_allclose(own.score, 1.0, atol=1e-6)
    assert own.target.tolist() == [0, 1] and own.params["score"] == "cosine similarity to the row's own embedding"
    embedding = model.run(feeds)[output].reshape(2, -1)
    masked = {**feeds, "attention_mask": feeds["attention_mask"][:1].copy(), "input_ids": feeds["input_ids"][:1]}
    masked["attention_mask"][0, 1] = 0
    without = model.run(masked)[output].reshape(1, -1)[0]
    cosine = without @ embedding[0] / np.linalg.norm(without) / np.linalg.norm(embedding[0])
    assert own.attributions["input_ids"][0, 1] == pytest.approx(1 - cosine, abs=1e-5)
    other = explain(model, {k: v[:1] for k, v in feeds.items()}, output=output, similar_to=embedding[1])
    assert other.score[0] == pytest.approx(embedding[0] @ embedding[1] / np.linalg.norm(embedding[0]) / np.linalg.norm(embedding[1]), abs=1e-5)


def test_kernel_shap_gives_captums_values_for_the_same_coalitions(digits):
    """KernelSHAP over 16 patches: Captum's coalitions (drawn by its own generator, replayed here) give
    its values, and the fit passes through both ends: the credits sum to f(input) - f(baseline)."""
    from captum.attr import KernelShap
    from torch.distributions import Categorical

    model, module, images = digits
    mask, count, samples = patch_mask(images.shape[1:], 7), 16, 40
    sizes = torch.arange(count, dtype=torch.float)
    probability = torch.tensor(count - 1) / (sizes * (count - sizes))
    probability[0] = 0.0
    torch.manual_seed(0)
    coalitions = [torch.ones(count, dtype=torch.long), torch.zeros(count, dtype=torch.long)]
    for _ in range(samples - 2):  # Captum's kernel_shap_perturb_generator
        k = Categorical(probability).sample()
        values = torch.randn(1, count)
        coalitions.append((values > torch.kthvalue(values, count - k).values.item()).long()[0])
    ours = explain(model, {"image": images[:1]}, method="kernel-shap", feature_mask=mask, coalitions=torch.stack(coalitions).numpy())
    torch.manual_seed(0)
    theirs = KernelShap(module).attribute(torch.from_numpy(images[:1]), target=int(ours.target[0]), baselines=0.0,
                                          feature_mask=torch.from_numpy(mask)[None], n_samples=samples).numpy()
    np.testing.assert_allclose(ours.attributions["image"], theirs, rtol=1e-3, atol=1e-3 * np.abs(theirs).max())
    at_baseline = model.run({"image": np.zeros_like(images[:1])})["logits"][0, ours.target[0]]
    assert ours.attributions["image"][0, 0, ::7, ::7].sum() == pytest.approx(ours.score[0] - at_baseline, rel=1e-3)
    drawn = explain(model, {"image": images[:2]}, method="kernel-shap", patch=7, samples=48, seed=3)
    assert drawn.attributions["image"].shape == images[:2].shape and drawn.params == {"patch": 7, "samples": 48, "seed": 3}
