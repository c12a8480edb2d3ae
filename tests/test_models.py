"""The reference model registry: every family builds, presets resolve, digits models are trained."""

import numpy as np
import pytest
import torch

import models
from tests.conftest import ZOO
from toolkit.spec import ModelSpec


def test_registry_lists_the_five_families():
    assert [f.name for f in models.families()] == ZOO
    for family in models.families():
        assert {"default", "tiny"} <= set(family.presets())


@pytest.mark.parametrize("name", ZOO)
def test_tiny_preset_builds_a_spec_that_runs(name):
    spec = models.build(name, "tiny")
    assert isinstance(spec, ModelSpec) and spec.task == models.FAMILIES[name].task
    from toolkit.runtime.samples import make_feeds

    feeds = make_feeds(spec.inputs, {d.name: d.check[1] for d in spec.dims}, seed=0)
    with torch.no_grad():
        out = spec.module(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))
    outputs = out if isinstance(out, tuple) else (out,)
    assert len(outputs) == len(spec.outputs)
    out = outputs[0]
    assert torch.isfinite(out).all()
    assert out.shape[0] == next(d.check[1] for d in spec.dims if d.name == "batch")


def test_unknown_model_and_preset_are_named():
    with pytest.raises(KeyError, match="unknown model 'resnet'; known: mlp, cnn"):
        models.build("resnet")
    with pytest.raises(KeyError, match="no preset 'huge'; presets: default, tiny"):
        models.build("gpt", "huge")


def test_gpt_ties_its_embeddings_and_uses_gpt2_init():
    from models.gpt import GPT, PRESETS

    model = GPT(PRESETS["default"])  # untrained: the initialisation itself
    assert model.lm_head.weight is model.wte.weight
    assert abs(model.wte.weight.std().item() - 0.02) < 0.002
    assert model.blocks[0].attn.proj.weight.std().item() < 0.02 / 2  # scaled by 1/sqrt(2·layers)


def test_digits_training_is_deterministic_across_thread_counts(tmp_path, monkeypatch):
    """Check rebuilds the reference and compares weight hashes, so training must not depend on threads."""
    from toolkit._scoped import torch_threads
    from toolkit.reference.source import weights_sha256

    hashes = []
    for threads in (1, 2):
        monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / f"cache{threads}"))
        with torch_threads(threads):
            hashes.append(weights_sha256(models.build("mlp", "tiny").module))
    assert hashes[0] == hashes[1]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_digit_classifiers_are_accurate(name):
    spec = models.build(name, "default")
    feeds, labels = spec.eval_data()
    assert len(labels) == 360 and set(np.unique(labels)) == set(range(10))
    with torch.no_grad():
        predicted = spec.module(torch.from_numpy(next(iter(feeds.values())))).argmax(1).numpy()
    assert (predicted == labels).mean() >= 0.95
