"""Gradient methods on the bundle's PyTorch source (toolkit.reference.gradients): input × gradient
is x · ∂f/∂x as autograd computes it, integrated gradients' completeness is reported as the ONNX
variant's own scores show it, token ids are explained through the embedding that reads them, and a
source nobody vouched for is not rebuilt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import toolkit
from models.hf_heads import hf_model
from toolkit.bundle import Bundle
from toolkit.errors import ToolkitError
from toolkit.reference.source import bundle_reference
from toolkit.runtime.model import Model
from toolkit.runtime.samples import make_feeds


@pytest.fixture(scope="module")
def digits(exported):
    path = exported("cnn", "default")
    images = bundle_reference(Bundle.open(path)).eval_data()[0]["image"][:3]
    return Model(path, provider="cpu"), images


def test_input_x_gradient_is_the_input_times_autograds_gradient(digits, exported):
    model, images = digits
    ours = toolkit.explain(model, {"image": images}, method="input-x-gradient")
    module = bundle_reference(model.bundle).module.eval()
    x = torch.from_numpy(images).requires_grad_()
    module(x)[torch.arange(len(images)), torch.from_numpy(ours.target)].sum().backward()
    np.testing.assert_allclose(ours.attributions["image"], (x * x.grad).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert ours.params["source_gap"]["max_abs"] <= 1e-4 * ours.params["source_gap"]["scale"]


def test_integrated_gradients_reports_its_completeness_as_the_variant_scores_it(digits):
    """The reported delta is sum(attributions) - (f(x) - f(baseline)), with f the ONNX variant's own
    target score: what the attributions leave unexplained of what the variant answered."""
    model, images = digits
    few, many = (toolkit.explain(model, {"image": images}, method="integrated-gradients", steps=s, baseline=0.1) for s in (4, 256))
    at_baseline = model.run({"image": np.full_like(images, 0.1)})["logits"][np.arange(len(images)), many.target]
    for explained in (few, many):
        unexplained = explained.attributions["image"].sum(axis=(1, 2, 3)) - (explained.score - at_baseline)
        np.testing.assert_allclose(explained.params["completeness"]["delta"], unexplained, rtol=1e-3, atol=1e-3)
    assert max(many.params["completeness"]["relative"]) < max(few.params["completeness"]["relative"])  # converges with steps


def test_token_ids_are_explained_through_the_embedding_that_reads_them(exported):
    from captum.attr import LayerIntegratedGradients

    model = Model(exported("encoder"), provider="cpu")
    feeds = make_feeds(model.inputs, {"batch": 2, "seq": 9}, 3)
    ours = toolkit.explain(model, feeds, method="integrated-gradients", steps=32)
    module = bundle_reference(model.bundle).module.eval()
    assert ours.params["embedding"] == "tok" and ours.attributions["input_ids"].shape == (2, 9)
    ids = torch.from_numpy(feeds["input_ids"])
    theirs = LayerIntegratedGradients(module, module.tok).attribute(
        ids, baselines=torch.zeros_like(ids), target=torch.from_numpy(ours.target), n_steps=32,
        additional_forward_args=(torch.from_numpy(feeds["attention_mask"]),)).sum(-1).detach().numpy()
    np.testing.assert_allclose(ours.attributions["input_ids"], theirs, rtol=1e-5, atol=1e-7)
    assert max(ours.params["completeness"]["relative"]) < 1e-3


def test_a_factory_source_is_rebuilt_only_when_vouched_for(exported, cli):
    path = exported("userpkg.toy:build")
    model = Model(path, provider="cpu")
    feeds = make_feeds(model.inputs, {d.name: d.check[1] for d in model.bundle.manifest.dims}, 0)
    with pytest.raises(ToolkitError, match="--trust-source"):
        toolkit.explain(model, feeds, method="input-x-gradient")
    vouched = toolkit.explain(model, feeds, method="input-x-gradient", target=(2, 1), trust_source=True)
    occluded = toolkit.explain(model, feeds, method="occlusion", target=(2, 1), window={"values": (1, 6), "weights": (1,)})
    (length, classes) = vouched.output_shape  # an output with two axes past the batch axis: the target indexes both
    assert (vouched.target == 2 * classes + 1).all() and vouched.where(0) == "[2, 1]" == occluded.where(0)
    assert all(vouched.attributions[n].shape == occluded.attributions[n].shape == feeds[n].shape for n in feeds)
    assert (occluded.attributions["values"][:, 3:] == 0).all()  # position 2's output reads no later position
    assert not model.bundle.trusted_source  # vouching for one explanation does not trust the model's bundle from then on
    refused = cli("explain", path, "--example", "--method", "integrated-gradients")
    assert refused.exit_code == 2 and "--trust-source" in refused.output


def test_the_command_line_reports_completeness_and_the_source_against_the_variant(digits, exported, cli):
    path = exported("cnn", "default")
    shown = cli("explain", path, "--example", "--method", "integrated-gradients", "--steps", "64")
    assert shown.exit_code == 0, shown.output
    assert "completeness: attributions sum to f(x) - f(baseline) within" in shown.output
    assert "source against fp32: target scores within" in shown.output
    refused = cli("explain", path, "--example", "--method", "input-x-gradient", "--compare", "fp32,fp32")
    assert refused.exit_code == 2 and "the same for every variant" in refused.output


@pytest.mark.slow  # every method end to end on two HF models: the methods have their own fast tests
@pytest.mark.parametrize("kind", ["bert-sequence", "vit"])
def test_hugging_face_classifiers_are_explained_by_every_method(kind, exported, cli, tmp_path):
    path = exported(f"hf:{hf_model(kind)}", None)
    model = Model(path, provider="cpu")
    feeds = {name: value[:2] for name, value in bundle_reference(Bundle.open(path, trust_source=True)).sample_data().items()}
    name = model.inputs[0].name
    image = kind == "vit"
    perturbed = toolkit.explain(model, feeds, method="occlusion", **({"window": (3, 8, 8)} if image else {}))
    gradients = toolkit.explain(model, feeds, method="integrated-gradients", steps=32, trust_source=True)
    assert perturbed.attributions[name].shape == gradients.attributions[name].shape == feeds[name].shape
    assert (perturbed.target == gradients.target).all()
    assert max(gradients.params["completeness"]["relative"]) < 0.05
    assert gradients.params.get("embedding", "") == ("" if image else "model.bert.embeddings.word_embeddings")
    plotted = cli("explain", path, "--example", "--plot", tmp_path / ("x.png" if image else "x.html"), "--method", "shapley",
                  *(["--patch", "8"] if image else []), "--samples", "2")
    assert plotted.exit_code == 0 and "drew" in plotted.output, plotted.output
