"""Localizing a variant's error (toolkit.compile.localize) on deliberate faults in one known layer
(tests/userpkg/faults.py): an fp16 overflow in an RMS norm, an int8 outlier channel, one corrupted
weight. Each must be named with its PyTorch module, in both modes, the bisection within ⌈log2 N⌉+2
onnxruntime runs."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from toolkit.bundle import Bundle
from toolkit.compile.localize import localize
from toolkit.compile.quantization import quantize

# the module fixture below is built once per xdist worker that runs one of these tests: one worker (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("faults")


@pytest.fixture(scope="module")
def faults(exported, tmp_path_factory):
    """bundle name → (bundle, variant, the module that holds the fault, what the cause must say)."""
    root = tmp_path_factory.mktemp("faults")
    overflowing = root / "overflowing"
    shutil.copytree(exported("userpkg.faults:boosted", None), overflowing)
    quantize(overflowing, mode="fp16")
    outlier = root / "outlier"
    shutil.copytree(exported("userpkg.faults:outlier_channel", None), outlier)
    quantize(outlier, mode="int8", smooth=False)  # smoothing would move the outlier into the weights
    corrupt = root / "corrupt"
    shutil.copytree(exported("userpkg.faults:plain", None), corrupt)
    bundle = Bundle.open(corrupt)
    proto = onnx.load(str(bundle.variant_path("fp32")))
    (weight,) = [t for t in proto.graph.initializer if t.name == "layers.4.weight"]
    values = numpy_helper.to_array(weight).copy()
    values[3] += 0.5  # one output channel of one layer off
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    onnx.save(proto, str(root / "corrupt.onnx"))
    bundle.add_variant("corrupt", root / "corrupt.onnx", recipe={"stage": "test", "parent": "fp32"}, precision="fp32")
    return {"overflowing": (overflowing, "fp16", "boost", r"fp16 overflow: linear_\d+ reaches [\d.e+]+ in fp32, past fp16's largest 65504"),
            "outlier": (outlier, "int8", "layers.3", r"int8 outlier channel: relu_\d+ channel 5 reaches"),
            "corrupt": (corrupt, "corrupt", "layers.4", r"^$")}


@pytest.mark.parametrize("mode", ["all", "bisect"])
@pytest.mark.parametrize("fault", ["overflowing", "outlier", "corrupt"])
def test_the_module_that_holds_the_fault_is_named_with_the_value_range_that_explains_it(faults, fault, mode):
    bundle, variant, module, cause = faults[fault]
    found = localize(bundle, variant, mode=mode, trust_source=True)
    assert found.first is not None and found.first.module == module, found.first
    assert found.first.rel > found.tolerance and (found.first.inputs_rel or 0.0) <= found.tolerance  # made here, not received
    assert found.growth.module == module
    assert re.search(cause, found.first.cause), found.first.cause
    if mode == "bisect":
        assert found.runs <= math.ceil(math.log2(found.matched)) + 2
    else:
        assert found.runs == 2 and len(found.tensors) == found.matched


def test_a_variant_within_its_tolerance_has_nothing_to_localize(exported, tmp_path):
    shutil.copytree(exported("userpkg.faults:plain", None), tmp_path / "plain")
    quantize(tmp_path / "plain", mode="fp16")
    found = localize(tmp_path / "plain", "fp16", trust_source=True)
    assert found.first is None and found.runs == 1 and all(e.rel <= found.tolerance for e in found.outputs)


def test_given_inputs_are_used_and_an_unknown_mode_or_the_reference_itself_is_refused(faults):
    from toolkit.errors import ToolkitError

    bundle, variant, module, _ = faults["outlier"]
    x = np.random.default_rng(5).standard_normal((4, 16)).astype(np.float32)
    found = localize(bundle, variant, feeds={"x": x}, trust_source=True)
    assert found.inputs == "the given inputs" and found.first.module == module
    with pytest.raises(ToolkitError, match="unknown localize mode 'half'; choose all, bisect"):
        localize(bundle, variant, mode="half")
    with pytest.raises(ToolkitError, match="is the reference graph itself"):
        localize(bundle, "fp32")


def test_the_rows_compared_are_the_held_out_rows_where_the_variant_departs_most(faults):
    """Its gates are judged on every held-out row: the failing case may be in any of them."""
    bundle, variant, module, _ = faults["outlier"]
    found = localize(bundle, variant, trust_source=True)
    assert found.inputs.startswith("the 16 of 64 held-out sample rows where int8's outputs depart most")
    first_rows = localize(bundle, variant, feeds={"x": np.random.default_rng(1).standard_normal((16, 16)).astype(np.float32)}, trust_source=True)
    assert first_rows.outputs[0].rel < found.outputs[0].rel  # the first 16 rows of the same sample are not the worst
    assert found.first.module == module


def test_candidates_whose_error_reaches_a_departing_output_rank_first():
    from onnx import TensorProto, helper

    from toolkit.compile.repair import _reaching_outputs

    node = lambda op, x, y: helper.make_node(op, [x], [y], name=y)  # noqa: E731
    graph = helper.make_graph([node("Relu", "x", "a"), node("Relu", "a", "b"), node("Relu", "b", "y"), node("Relu", "a", "c"), node("Relu", "c", "z")],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("y", "z")])
    # b departs and so does the output y after it; c departs but z, after it, does not: attenuated
    assert _reaching_outputs(graph, {"b", "y", "c"}, ["y"]) == {"b", "y"}
    assert _reaching_outputs(graph, {"a", "b", "c"}, []) == set()
    assert _reaching_outputs(graph, {"a", "y"}, ["y"], unmeasured={"b"}) == {"a", "y"}  # through what was not compared


def test_check_localizes_the_variants_that_fail_as_a_table_and_as_json(faults):
    bundle, variant, module, _ = faults["overflowing"]
    result = subprocess.run([sys.executable, "-m", "toolkit.cli", "check", str(bundle), "--localize", "--json", "-", "--trust-source"],
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "250"})
    assert result.returncode == 1, result.stderr  # fp16 fails its check
    report = json.loads(result.stdout)
    assert list(report["localize"]) == [variant] and report["localize"][variant]["first"]["module"] == module
    assert report["localize"][variant]["first"]["rel"] == "inf"  # an overflow, as JSON allows
    assert "first past tolerance" in result.stderr and "fp16 overflow" in result.stderr


def test_bisect_without_localize_is_refused(cli, tmp_path):
    result = cli("check", tmp_path, "--bisect")
    assert result.exit_code == 2 and "--bisect is a way of localizing: give it with --localize." in result.output
