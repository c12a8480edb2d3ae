"""Stage check: parity evidence per variant, stored in the manifest; failures that must fail."""

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.conftest import ZOO
from toolkit.bundle import Bundle, sha256_file
from toolkit.compile.parity import SEEDS, check
from toolkit.compile.tolerances import PROFILES, profile
from toolkit.errors import CheckFailed, ToolkitError


def _slow_unless_small(name: str, preset: str):
    """The default presets and the tiny decoders (greedy generation, a static part) take tens of seconds."""
    slow = preset == "default" or name in ("gpt", "seq2seq")
    return pytest.param(name, preset, marks=pytest.mark.slow if slow else (), id=f"{name}-{preset}")


@pytest.mark.parametrize(("name", "preset"), [_slow_unless_small(n, p) for p in ("tiny", "default") for n in ZOO])
def test_every_zoo_model_passes_at_two_shapes(exported, copy_of, name, preset):
    path = copy_of(exported(name, preset))
    record = check(path)["fp32"]
    assert record["passed"], record
    sizes = {tuple(sorted(c["sizes"].items())) for c in record["cases"]}
    assert len(sizes) == 2 and len(record["cases"]) == 2 * len(SEEDS)
    for dim in Bundle.open(path).manifest.dims:  # two distinct sizes per dynamic dim
        assert len({c["sizes"][dim.name] for c in record["cases"]}) == 2
    for stats in record["outputs"].values():
        assert 0 <= stats["max_abs_err"] <= PROFILES["fp32"].atol + PROFILES["fp32"].rel * stats["scale"]
    assert record["runtime"].startswith("onnxruntime ") and record["reference"].startswith("torch ")
    assert Bundle.open(path).manifest.variants["fp32"].parity == record  # stored in the manifest


@pytest.mark.parametrize("preset", ["tiny", "default"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_digit_classifiers_report_accuracy(exported, copy_of, name, preset):
    record = check(copy_of(exported(name, preset)))["fp32"]
    accuracy = record["accuracy"]
    assert accuracy["variant"] >= 0.95 and accuracy["reference"] >= 0.95
    assert accuracy["drop"] <= PROFILES["fp32"].max_accuracy_drop and accuracy["passed"]


@pytest.mark.slow
def test_user_model_checks(exported, copy_of):
    record = check(copy_of(exported("userpkg.toy:build")), trust_source=True)["fp32"]
    assert record["passed"] and set(record["outputs"]) == {"scaled", "pooled"}


def test_a_dim_baked_in_by_the_exporter_fails(exported, copy_of):
    record = check(copy_of(exported("userpkg.toy:traced_constant", exporter="torchscript")), trust_source=True)["fp32"]
    assert not record["passed"]
    assert len(record["errors"]) == len(SEEDS)  # every case at the second size
    assert all("'seq': 11" in e and "Reshape node" in e for e in record["errors"])


def _add_wrong_variant(path, scale=1.01):
    """A copy of fp32 with one weight scaled: a variant that is wrong on purpose."""
    bundle = Bundle.open(path)
    proto = onnx.load(path / bundle.manifest.variants["fp32"].file)
    weight = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(scale), weight.name))
    onnx.save(proto, path / "model.wrong.onnx")
    bundle.manifest.variants["wrong"] = dataclasses.replace(
        bundle.manifest.variants["fp32"], file="model.wrong.onnx", sha256=sha256_file(path / "model.wrong.onnx"),
        recipe={"stage": "test", "options": {}, "parent": "fp32"},
    )
    bundle.save()


def test_a_wrong_variant_fails_alone_and_is_recorded(exported, copy_of):
    path = copy_of(exported("encoder"))
    _add_wrong_variant(path)
    records = check(path)
    assert records["fp32"]["passed"] and not records["wrong"]["passed"]
    assert records["wrong"]["outputs"]["logits"]["max_rel_err"] > PROFILES["fp32"].rel
    assert not Bundle.open(path).manifest.variants["wrong"].parity["passed"]


def test_only_the_requested_variants_are_checked(exported, copy_of):
    path = copy_of(exported("mlp"))
    _add_wrong_variant(path)
    assert list(check(path, variants=["fp32"])) == ["fp32"]
    assert Bundle.open(path).manifest.variants["wrong"].parity is None
    with pytest.raises(ToolkitError, match="has no variant 'int8'; its variants: fp32, wrong"):
        check(path, variants=["int8"])


def test_a_reference_whose_weights_changed_is_refused(exported, copy_of):
    path = copy_of(exported("gpt"))
    bundle = Bundle.open(path)
    bundle.manifest.reference["weights_sha256"] = "0" * 64
    bundle.save()
    with pytest.raises(CheckFailed, match="no longer has the weights it was exported with"):
        check(path)


def test_tolerance_profiles_are_data_in_one_place():
    fp32 = profile("fp32")
    assert fp32.allows(1e-5 + 1e-4 * 10, scale=10) and not fp32.allows(2e-3, scale=10)
    assert profile("int8").allows(1.0, scale=1.0)  # judged by task metrics, not elementwise
    with pytest.raises(ToolkitError, match="no tolerance profile for precision 'int2'"):
        profile("int2")


def test_a_greedy_divergence_is_allowed_only_at_a_near_tie():
    """fp32 may choose another token than the reference only where rounding could overturn the
    reference's lead; int8 agreement is reported, not gated."""
    from toolkit.compile.parity import _Greedy

    want = np.array([[5, 6, 7], [8, 9, 10]])
    leads = np.array([[3.0, 3.0, 3.0], [3.0, 1e-4, 3.0]])  # row 2's second token was nearly a tie
    greedy = _Greedy(prompts=[[1], [2]], tokens=want, leads=leads, scales=np.full((2, 3), 10.0))
    fp32 = profile("fp32")
    assert greedy.unexplained(want, fp32) == []
    assert greedy.unexplained(np.array([[5, 6, 7], [8, 4, 4]]), fp32) == []  # diverged at the near-tie: fine after it
    (error,) = greedy.unexplained(np.array([[5, 1, 1], [8, 9, 10]]), fp32)
    assert "prompt 1 of 2 chose token 1 at step 2 where the reference chose 6, which led by 3" in error
    assert greedy.unexplained(np.array([[5, 1, 1], [8, 9, 10]]), profile("int8")) == []
