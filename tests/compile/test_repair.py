"""Repairing variants that fail their gates (toolkit.compile.repair) on deliberate faults in one
known layer (tests/userpkg/faults.py): fp16 with fewer nodes in fp32 than the fixed op-type list,
int8 and int8-static keeping the layers around an outlier channel, within a budget, every attempt
recorded; and `build` repairing on its own."""

from __future__ import annotations

import re
import shutil

import pytest

from toolkit.bundle import Bundle
from toolkit.compile import check, quantize, repair


def _bundle(exported, tmp_path, model: str, **quantizations):
    out = tmp_path / model.rpartition(":")[2]
    shutil.copytree(exported(model, None), out)
    for mode, options in quantizations.items():
        quantize(out, mode=mode.replace("_", "-"), trust_source=True, **options)
    return out


def test_fp16_is_repaired_keeping_the_layer_whose_weights_it_cannot_hold(exported, tmp_path):
    bundle = _bundle(exported, tmp_path, "userpkg.faults:boosted", fp16={})
    assert not check(bundle, variants=["fp16"], trust_source=True)["fp16"]["passed"]  # boost's weights and outputs pass 65504
    result = repair(bundle, "fp16", trust_source=True)
    variant = Bundle.open(bundle).manifest.variants["fp16"]
    assert result["passed"] and variant.parity["passed"]
    assert [k["module"] for k in result["kept"]] == ["boost"] and result["fixed_list_nodes"] == 0
    assert variant.recipe["options"]["repair"] == result and result["attempts"][-1]["passed"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "int8-static"])
def test_int8_is_repaired_keeping_the_layers_of_the_outlier_channel(exported, tmp_path, mode):
    # made without smoothing, which alone would fix this fault (test_quantize.py): the search is what is tested here
    bundle = _bundle(exported, tmp_path, "userpkg.faults:outlier_channel", **{mode.replace("-", "_"): {"smooth": False}})
    assert not check(bundle, variants=[mode], trust_source=True)[mode]["passed"]
    result = repair(bundle, mode, trust_source=True)
    assert result["passed"] and Bundle.open(bundle).manifest.variants[mode].parity["passed"]
    # the layer that reads the outlier channel; QDQ, also what makes it (layers.2 and its ReLU, whose
    # output the quantizer would round)
    assert "layers.3" in {k["module"] for k in result["kept"]} and len(result["kept"]) <= (1 if mode == "int8" else 3)
    ops = Bundle.open(bundle).manifest.variants[mode].recipe["options"]["ops"]["Gemm"]
    assert ops["quantized"] >= ops["with_weights"] - 2
    # keeping one node first, then the most int8 may keep (half its 7 Gemms), then bisection: few attempts
    assert len(result["attempts"]) <= 4 and all(a["kept"] for a in result["attempts"])


@pytest.mark.slow
def test_a_variant_no_repair_fixes_says_which_of_its_8_bit_sides_binds(exported, tmp_path):
    """Outlier channels in every layer: its activations bind, its weights would pass, and the
    measurement leaves the bundle as the repair left it."""
    bundle = _bundle(exported, tmp_path, "userpkg.faults:outlier_channels_everywhere", int8_static={"smooth": False})
    assert not check(bundle, variants=["int8-static"], trust_source=True)["int8-static"]["passed"]
    result = repair(bundle, "int8-static", trust_source=True)
    assert not result["passed"] and result["note"].startswith("bound to fail")
    binds = result["binds"]
    assert not binds["activations"]["passed"] and binds["weights"]["passed"]
    assert binds["activations"]["metric"] == "max_score_rel" and binds["activations"]["value"] > binds["weights"]["value"]
    assert binds["verdict"].startswith("its 8-bit activations bind: with 16-bit weights it still misses the gates (max score rel")
    manifest = Bundle.open(bundle).manifest
    assert set(manifest.variants) == {"fp32", "int8-static"}
    assert "bits" not in manifest.variants["int8-static"].recipe["options"]  # the 16-bit measurements were made elsewhere
    assert not manifest.variants["int8-static"].parity["passed"]


@pytest.mark.parametrize(("activations", "weights", "verdict"), [
    (False, False, "each side alone misses the gates at 8 bits (8-bit activations with 16-bit weights: max score rel 0.2; "
                   "8-bit weights with 16-bit activations: max score rel 0.1)"),
    (True, False, "its 8-bit weights bind: with 16-bit activations it still misses the gates (max score rel 0.1); "
                  "with 16-bit weights it passes (max score rel 0.2)"),
    (True, True, "each side alone passes at 8 bits (8-bit activations: max score rel 0.2; 8-bit weights: max score rel 0.1): "
                 "only their errors together miss the gates"),
])
def test_what_binds_is_said_as_measured(activations, weights, verdict):
    from toolkit.compile.repair import _verdict

    sides = {"activations": {"passed": activations, "metric": "max_score_rel", "value": 0.2},
             "weights": {"passed": weights, "metric": "max_score_rel", "value": 0.1}}
    assert _verdict(sides).startswith(verdict)


def test_no_budget_no_attempt(exported, tmp_path):
    bundle = _bundle(exported, tmp_path, "userpkg.faults:boosted", fp16={})
    result = repair(bundle, "fp16", budget=0, trust_source=True)
    assert not result["passed"] and result["attempts"] == []


def test_a_variant_quantize_did_not_make_is_refused(exported, tmp_path):
    from toolkit.errors import ToolkitError

    bundle = _bundle(exported, tmp_path, "userpkg.faults:plain")
    with pytest.raises(ToolkitError, match="variant 'fp32' was not made by quantize"):
        repair(bundle, "fp32")


@pytest.mark.slow
def test_build_repairs_and_says_how(tmp_path, cli):
    result = cli("build", "userpkg.faults:boosted", "-o", tmp_path / "b", "--no-select", "--mode", "fp16")
    assert result.exit_code == 0, result.output
    record = Bundle.open(tmp_path / "b").manifest.variants["fp16"]
    assert record.parity["passed"] and record.recipe["options"]["repair"]["passed"]
    assert re.search(r"fp16: repaired keeping 1 node in fp32, where the fixed op-type list kept 0 .*: node_Gemm_0 \(boost: fp16 overflow", result.output)
    # smoothing moves the outlier channel into the weights as int8-static is made: nothing left to repair
    result = cli("build", "userpkg.faults:outlier_channel", "-o", tmp_path / "c", "--no-select", "--mode", "int8-static")
    record = Bundle.open(tmp_path / "c").manifest.variants["int8-static"]
    assert result.exit_code == 0 and record.parity["passed"] and "repair" not in record.recipe["options"], result.output
    assert ["node_linear_3"] in [s["readers"] for s in record.recipe["options"]["smoothed"]]


@pytest.mark.parametrize(("passing", "tried", "found"), [
    (range(1, 9), [1], 1),  # the first node is the fault
    (range(5, 9), [1, 8, 5, 3, 4], 5),  # then all it may keep, then bisection
    ((), [1, 8], None),  # bound to fail: stops after two attempts
])
def test_the_search_for_nodes_to_keep_stops_when_the_most_it_may_keep_fails(passing, tried, found):
    from toolkit.compile.repair import _search

    made = []
    result = _search(8, lambda k: made.append(k) or k in passing, lambda: True)
    assert made == tried and result == ((True, found, False) if found else (False, 0, True))


def test_another_calibration_is_tried_only_for_the_range_problem_it_fixes():
    from toolkit.compile.localize import Localization, TensorError
    from toolkit.compile.repair import _calibrations

    def found(cause: str) -> Localization:
        error = TensorError("relu_3", "n", "Relu", "", 1.0, 0.6, 1.0, 0.01, cause, "relu_2")
        return Localization("b", "int8-static", "fp32", "int8", 0.05, "all", "", 1, 1, [], error, error, [error])

    saturated, outlier = "int8 saturation: relu_2 reaches 55, past its calibrated range ±49", "int8 outlier channel: relu_2 channel 5 reaches 55"
    base = {"method": "minmax", "per_channel": True}
    assert _calibrations(found(saturated), base, None) == []  # minmax's range is already the calibration data's
    assert [c for c, _ in _calibrations(found(saturated), {**base, "method": "percentile"}, None)] == [{"method": "minmax"}]
    assert [c for c, _ in _calibrations(found(outlier), base, None)] == [{"method": "percentile"}]
    assert _calibrations(found(""), base, None) == []  # no range problem: no calibration can help


def test_a_repair_that_stopped_bound_to_fail_says_so_not_that_time_ran_out():
    from toolkit.cli.render import _repair_line

    attempts = [{"gate": "min_cosine 0.1855 against a threshold of 0.99", "settings": {}}] * 3
    line = _repair_line({"passed": False, "attempts": attempts, "seconds": 63, "budget": 300, "kept": [],
                         "note": "bound to fail: keeping all 24 candidate nodes in fp32 (the most it may keep) missed its gates too"})
    assert line.startswith("not repaired (3 attempts, 63 s): bound to fail: keeping all 24") and "within" not in line
    verdict = "its 8-bit activations bind: with 16-bit weights it still misses the gates (max score rel 0.138)"
    assert _repair_line({"passed": False, "attempts": attempts, "seconds": 63, "budget": 300, "kept": [], "note": "bound to fail: ...",
                         "binds": {"verdict": verdict}}).endswith(f"; {verdict}")


def test_fp16_nodes_kept_in_fp32_exchange_fp32_directly(exported, tmp_path):
    """`boost` writes values near 1e6, past fp16's 65504, and `calm` reads them down with weights
    below fp16's smallest: kept in fp32 together, the two pass that tensor in fp32, not through a
    Cast to fp16 and back (where it became inf); and a repair passes."""
    import onnx

    bundle = _bundle(exported, tmp_path, "userpkg.faults:boosted", fp16={})
    assert not check(bundle, variants=["fp16"], trust_source=True)["fp16"]["passed"]
    quantize(bundle, mode="fp16", keep_nodes=["linear_3", "linear_4"], trust_source=True)  # the tensors boost and calm make
    record = check(bundle, variants=["fp16"], trust_source=True)["fp16"]
    assert record["passed"], record["outputs"]
    graph = onnx.load(str(Bundle.open(bundle).variant_path("fp16")), load_external_data=False).graph
    made = {out: node for node in graph.node for out in node.output}
    for node in graph.node:  # no Cast to fp32 reads a Cast to fp16
        if node.op_type == "Cast" and node.attribute[0].i == onnx.TensorProto.FLOAT and node.input[0] in made:
            source = made[node.input[0]]
            assert not (source.op_type == "Cast" and source.attribute[0].i == onnx.TensorProto.FLOAT16), (source.name, node.name)
    quantize(bundle, mode="fp16", trust_source=True)
    assert repair(bundle, "fp16", trust_source=True)["passed"]
