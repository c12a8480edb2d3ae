"""Hugging Face models with task heads (models/hf_heads.py, seeded tiny configs): the task and the
outputs come from the architecture, images come in as the processor makes them, an architecture
toolkit does not export is named, and weights the checkpoint lacks never make a reference that
changes between loads."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from models.hf_heads import hf_model
from toolkit.errors import ToolkitError

pytest.importorskip("transformers", reason="hf: models need transformers (pip install -e '.[test]')")

# kind → (task, inputs, outputs and their shapes for 3 rows of the sample inputs, None: the sample length)
HEADS = {
    "bert-sequence": ("classify", ["input_ids", "attention_mask"], {"logits": (3, 3)}),
    "bert-regression": ("regress", ["input_ids", "attention_mask"], {"logits": (3, 1)}),
    "bert-token": ("classify", ["input_ids", "attention_mask"], {"logits": (3, None, 5)}),
    "bert-masked": ("classify", ["input_ids", "attention_mask"], {"logits": (3, None, 320)}),
    "bert-answer": ("classify", ["input_ids", "attention_mask"], {"start_logits": (3, None), "end_logits": (3, None)}),
    "roberta-token": ("classify", ["input_ids", "attention_mask"], {"logits": (3, None, 4)}),
    "distilbert-sequence": ("classify", ["input_ids", "attention_mask"], {"logits": (3, 2)}),
    "vit": ("classify", ["pixel_values"], {"logits": (3, 10)}),
    "resnet": ("classify", ["pixel_values"], {"logits": (3, 10)}),
    "convnext": ("classify", ["pixel_values"], {"logits": (3, 10)}),
}


@pytest.mark.parametrize("kind", [k if k in ("bert-token", "vit") else pytest.param(k, marks=pytest.mark.slow) for k in HEADS])
def test_the_task_and_outputs_come_from_the_architecture(kind):
    from toolkit.reference.hf import hf_spec
    from toolkit.reference.run import run_reference

    task, inputs, outputs = HEADS[kind]
    spec = hf_spec(hf_model(kind))
    assert (spec.task, [t.name for t in spec.inputs], list(spec.outputs)) == (task, inputs, list(outputs))
    sample = spec.sample_data()
    got = run_reference(spec, {name: value[:3] for name, value in sample.items()})
    length = sample[inputs[0]].shape[1]
    assert {name: value.shape for name, value in got.items()} == \
        {name: tuple(length if d is None else d for d in shape) for name, shape in outputs.items()}


def test_roberta_positions_stop_before_its_offset_runs_out():
    """RoBERTa numbers positions from its padding index + 1: two of its max_position_embeddings are
    never a token's, and the longest sample must fit in the rest."""
    from toolkit.reference.hf import hf_spec

    spec = hf_spec(hf_model("roberta-token"))
    (seq,) = [d for d in spec.dims if d.name == "seq"]
    assert seq.max == 64 - 2 and spec.sample_data()["input_ids"].shape[1] <= seq.max


def test_images_come_at_the_processors_size_and_normalisation():
    from toolkit.reference.hf import hf_spec

    spec = hf_spec(hf_model("vit"))
    assert spec.inputs[0].shape == ("batch", 3, 32, 32)
    pixels = spec.sample_data()["pixel_values"]  # ViT's processor: (x - 0.5) / 0.5
    assert pixels.shape == (256, 3, 32, 32) and pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert not np.array_equal(spec.calibration_data(4)["pixel_values"], pixels[:4])  # calibration is not the held-out set


def test_natural_images_have_photographs_spectrum():
    """Power concentrated at low frequencies, unlike noise, and neighbouring pixels
    alike, as in photographs."""
    from toolkit.reference.samples import natural_images

    images = natural_images(16, 3, 64, 64, seed=0)
    assert images.shape == (16, 3, 64, 64) and images.min() >= 0.0 and images.max() <= 1.0
    neighbours = np.corrcoef(images[..., :-1].ravel(), images[..., 1:].ravel())[0, 1]
    channels = np.corrcoef(images[:, 0].ravel(), images[:, 1].ravel())[0, 1]
    assert neighbours > 0.9 and channels > 0.5
    power = np.abs(np.fft.rfft2(images - images.mean(axis=(2, 3), keepdims=True))) ** 2
    assert power[..., :8, :8].sum() > 0.5 * power.sum()  # under 2% of the frequencies
    assert np.array_equal(images, natural_images(16, 3, 64, 64, seed=0))


def test_an_architecture_it_does_not_export_is_named_with_the_supported_ones(tmp_path):
    from toolkit.reference.hf import hf_spec

    with pytest.raises(ToolkitError, match=r"architecture BertForNextSentencePrediction is not supported; toolkit exports "
                                           r".*ForTokenClassification.*ForConditionalGeneration \(encoder-decoders, of text or speech\)"):
        hf_spec(_saved_as(tmp_path, "bert-sequence", "BertForNextSentencePrediction"))


def _saved_as(tmp_path, kind: str, architecture: str):
    model = tmp_path / architecture
    shutil.copytree(hf_model(kind), model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": [architecture]}))
    return model


def test_a_head_the_checkpoint_lacks_is_refused_naming_it(tmp_path):
    """A token classifier's checkpoint loaded as a sequence classifier: its head (classifier.dense,
    classifier.out_proj) would be random at every load."""
    from toolkit.reference.hf import hf_spec

    model = _saved_as(tmp_path, "roberta-token", "RobertaForSequenceClassification")
    with pytest.raises(ToolkitError, match=r"no weights for classifier\.dense, classifier\.out_proj, .*differ between two loads.*"
                                           r"holds weights this one does not read: classifier\.bias, classifier\.weight"):
        hf_spec(model)


def test_weights_the_outputs_never_read_are_zeroed_so_the_reference_is_the_same_at_every_load(tmp_path):
    """The same checkpoint as a bare encoder: transformers adds a pooler it initialises randomly,
    which the sentence embedding never reads."""
    from toolkit.reference.hf import hf_spec
    from toolkit.reference.source import weights_sha256

    model = _saved_as(tmp_path, "roberta-token", "RobertaModel")
    first, second = hf_spec(model), hf_spec(model)
    assert first.task == "embed"
    assert not first.module.model.pooler.dense.weight.any()
    assert weights_sha256(first.module) == weights_sha256(second.module)


def test_per_token_agreement_is_judged_at_real_tokens_only():
    """Outputs whose axis 1 is the attention mask's are judged per real token; others whole, even
    when their shape happens to equal the mask's."""
    from types import SimpleNamespace

    from toolkit.compile.parity import _per_token_outputs, _real_tokens
    from toolkit.spec import TensorSpec

    manifest = SimpleNamespace(
        inputs=[TensorSpec("input_ids", "int64", ("batch", "seq"), kind="ids", high=9), TensorSpec("attention_mask", "int64", ("batch", "seq"), kind="mask")],
        outputs=[TensorSpec("logits", "float32", ("batch", "seq", 5)), TensorSpec("start_logits", "float32", ("batch", "seq")),
                 TensorSpec("scores", "float32", ("batch", 3, 4))])
    assert _per_token_outputs(manifest) == {"logits"}  # start_logits: one answer position per row, judged whole
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    got, expected = np.array([[1, 2, 9], [4, 9, 9]]), np.array([[1, 2, 0], [4, 0, 0]])
    assert [a.tolist() for a in _real_tokens(got, expected, mask)] == [[1, 2, 4], [1, 2, 4]]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["roberta-token", "bert-answer", "vit", "resnet"])
def test_a_head_model_builds_with_parity(tmp_path, kind):
    """export, check and build: fp32 and the fused graph pass their gates against transformers; the
    quantized variants carry their evidence (a seeded-random model's near-tied classes may fail int8's
    top-1 gate: that is recorded, not hidden)."""
    from toolkit.compile.pipeline import build

    bundle = build(f"hf:{hf_model(kind)}", tmp_path / kind, select=False)
    variants = bundle.manifest.variants
    assert bundle.manifest.task == HEADS[kind][0]
    for name in ("fp32", "opt"):
        assert variants[name].parity["passed"], variants[name].parity
    assert variants["fp32"].parity["task_metric"]["value"] == 1.0
    # int4 where build finds a transformer (attention, MatMul weights): not the ResNet
    expected = {"int8", "fp16"} | ({"int8-static"} if kind in ("resnet",) else {"int4"})
    assert expected <= set(variants) | set(bundle.manifest.failed)
    for name in expected & set(variants):
        assert variants[name].parity["task_metric"]["metric"] == "top1_agreement"


def test_an_encoder_decoders_bare_model_is_not_taken_for_an_encoder(tmp_path):
    from toolkit.reference.hf import hf_spec

    with pytest.raises(ToolkitError, match=r"architecture T5Model \(an encoder-decoder\) is not supported.*encoder-decoders"):
        hf_spec(_saved_as(tmp_path, "t5", "T5Model"))


@pytest.mark.slow
def test_int8_quantizes_a_classifier_whose_head_is_a_gemm(exported, tmp_path):
    """BERT's sequence head is a Gemm with a transposed weight, which the quantizer makes a MatMul
    under the same name: the weight's shape the exporter recorded must not stop it."""
    from toolkit.compile import quantize

    bundle = tmp_path / "bert"
    shutil.copytree(exported(f"hf:{hf_model('bert-sequence')}", None), bundle)
    quantize(bundle, mode="int8", trust_source=True)  # its smoothing calibrates on the reference's inputs
    from toolkit.bundle import Bundle

    assert Bundle.open(bundle).manifest.variants["int8"].recipe["options"]["ops"]["Gemm"]["quantized"] == 2
