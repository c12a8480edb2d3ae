"""The manifest against the validator, fuzzed (hypothesis): whatever a manifest says, either opening the
bundle refuses it with a ToolkitError naming the field, or every later stage (inspect, load and run,
generate, the server's prompter) works or refuses it with a ToolkitError; never another exception."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolkit.bundle import Bundle
from toolkit.errors import ToolkitError

FUZZED = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                                      HealthCheck.too_slow])
scalars = (st.none() | st.booleans() | st.integers(min_value=-3, max_value=70) | st.sampled_from([2**31, 2**63, -(2**63), 10**30])
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(["", "x", "fp32", "float32", "complex64", "batch", "seq",
                                                                               "../x", "past+seq", "hf", "bytes", "features"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["passed", "variant", "min",
                      "max", "export", "check", "name", "x"]), inner, max_size=3), max_leaves=6)


def _paths(value, prefix=()):
    """Every path into the JSON `value` (keys and indices), the value itself first."""
    yield prefix
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from _paths(inner, (*prefix, index))


@st.composite
def mutations(draw, manifest):
    """The manifest with one to three fields replaced, deleted or added."""
    mutated = copy.deepcopy(manifest)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(mutated) if p]
        path = draw(st.sampled_from(paths))
        parent = mutated
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["generation", "best", "suppress_tokens", "eos_token_ids", "check", "high", "io"]))] = draw(values)
        else:
            parent[path[-1]] = draw(values)
    return mutated


def _later_stages(path) -> None:
    """What reads a bundle after it opened: inspect, load and run, generate, the server's prompter."""
    from toolkit.runtime.describe import describe
    from toolkit.runtime.generate import Generator
    from toolkit.runtime.model import Model
    from toolkit.runtime.samples import make_feeds
    from toolkit.serve.generation import Prompter

    describe(path)
    model = Model(path, provider="cpu")
    manifest = model.bundle.manifest
    model.run(make_feeds(model.inputs, {d.name: d.check[0] for d in manifest.dims}, 0))
    if manifest.generation is not None:
        Prompter(model.bundle)
        Generator(model, cache="growing").generate("ab", max_new_tokens=2)


def _fuzz(exported, tmp_path, model):
    source = exported(model)
    manifest = json.loads((source / "manifest.json").read_text())
    target = tmp_path / "bundle"
    shutil.copytree(source, target)

    @FUZZED
    @given(mutations(manifest))
    def run(mutated):
        (target / "manifest.json").write_text(json.dumps(mutated))
        try:
            Bundle.open(target)
        except ToolkitError:
            return  # refused, naming what is wrong
        try:
            _later_stages(target)
        except ToolkitError:
            pass

    run()


@pytest.mark.parametrize("model", ["mlp", "gpt"])
def test_nothing_the_validator_accepts_crashes_a_later_stage(exported, tmp_path, model):
    _fuzz(exported, tmp_path, model)


@pytest.mark.parametrize(("model", "change", "message"), [
    ("mlp", lambda m: m["dims"]["batch"].__setitem__("check", [1]), r"field dims\.batch\.check must be two distinct integers"),
    ("gpt", lambda m: m["generation"].pop("eos_token_id"), r"field generation\.eos_token_id is missing"),
    ("gpt", lambda m: m["generation"].__setitem__("suppress_tokens", [0, 10**6]), r"generation\.suppress_tokens: token 1000000 is outside"),
    ("gpt", lambda m: m["generation"].__setitem__("context", "256"), r"field generation\.context must be an integer >= 1"),
    ("mlp", lambda m: m["variants"]["fp32"].__setitem__("parity", {"max_abs": 0.1}), r"variants\.fp32\.parity must be an object whose \"passed\""),
    ("mlp", lambda m: m["inputs"][0].__setitem__("dtype", "complex64"), r"dtype 'complex64' is none of"),
    ("mlp", lambda m: m.__setitem__("best", {"variant": "int8"}), r"best names variant 'int8', which the bundle does not have"),
    ("mlp", lambda m: m["inputs"][0].__setitem__("shape", ["batch", "width"]), r"names dim 'width', which is not among"),
])
def test_each_manifest_that_passed_then_crashed_is_refused_naming_its_field(exported, copy_of, model, change, message):
    bundle = copy_of(exported(model))
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ToolkitError, match=message):
        Bundle.open(bundle)
