"""toolkit build: every variant built and judged in one go; `best` is measured, recorded, and never
a variant that failed its gates."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import toolkit
from toolkit.bundle import Bundle
from toolkit.compile.parity import check
from toolkit.compile.pipeline import choose_best, select_best, timed_variants
from toolkit.errors import ToolkitError

# the module fixture below is built once per xdist worker that runs one of these tests: one worker (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("build-cnn")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from toolkit.compile.pipeline import build

    return build("cnn", tmp_path_factory.mktemp("build") / "cnn", preset="tiny", max_time=0.05).path


@pytest.mark.slow
def test_build_makes_and_checks_every_variant(built):
    manifest = Bundle.open(built).manifest
    # a CNN gets int8-static: dynamic int8 leaves convolutions in fp32
    assert set(manifest.variants) == {"fp32", "opt", "int8", "int8-static", "fp16"}
    for name, variant in manifest.variants.items():
        assert variant.parity is not None, name
        assert "accuracy" in variant.parity and variant.parity["task_metric"]["metric"] == "top1_agreement"
    # dynamic int8 starts from the optimized graph once that holds parity; the others from the export
    parents = {name: v.recipe["parent"] for name, v in manifest.variants.items() if v.recipe["stage"] == "quantize"}
    assert parents == {"int8": "opt", "int8-static": "fp32", "fp16": "fp32"}


@pytest.mark.slow
def test_best_is_recorded_with_its_measurements_and_loads(built):
    best = Bundle.open(built).manifest.best
    assert best["provider"] == "cpu" and best["rule"]
    passing = {n for n, v in Bundle.open(built).manifest.variants.items() if v.parity["passed"]}
    assert set(best["p50_ms"]) == passing and best["variant"] in passing
    assert set(best["p50_ms"]["fp32"]) == {"batch 1", "batch 32"}
    # each variant was timed beside fp32: the ratios the choice used come from those pairs
    assert set(best["vs_fp32"]) == passing and best["vs_fp32"]["fp32"] == {"batch 1": 1.0, "batch 32": 1.0}
    assert all(r > 0 for v in passing for r in best["vs_fp32"][v].values())
    model = toolkit.load(built, variant="best", provider="cpu")
    assert model.variant == best["variant"]


def test_choose_best_takes_the_fastest_that_is_nowhere_slower_than_fp32():
    p50 = {
        "fp32": {"b1": 1.0, "b32": 10.0},
        "int8": {"b1": 0.3, "b32": 11.0},  # fastest at batch 1 but 10% slower than fp32 at 32: excluded
        "opt": {"b1": 0.9, "b32": 9.0},
        "fp16": {"b1": 0.95, "b32": 9.5},
    }
    assert choose_best(p50) == "opt"
    assert choose_best({**p50, "static": {"b1": 0.5, "b32": 10.4}}) == "static"  # 4% at batch 32 is noise
    assert choose_best({"fp32": {"b1": 1.0}}) == "fp32"
    assert choose_best({"int8": {"b1": 2.0}, "opt": {"b1": 1.0}}) == "opt"  # fp32 failed: fastest passing


@pytest.mark.parametrize(("ratio", "best"), [(0.97, "fp32"), (0.96, "fp32"), (0.9, "fp16")])
def test_a_lower_precision_must_win_by_more_than_the_noise(ratio, best):
    """fp16 for a 3-4% gain, inside the noise margin, would give up precision for nothing measurable;
    a variant of the same precision (opt) needs no such lead."""
    p50 = {"fp32": {"b1": 1.0, "b32": 10.0}, "fp16": {"b1": ratio, "b32": 10 * ratio}}
    assert choose_best(p50, lower_precision=["fp16"]) == best
    assert choose_best({"fp32": p50["fp32"], "opt": p50["fp16"]}, lower_precision=["fp16"]) == "opt"


@pytest.mark.slow
def test_a_variant_forced_to_be_wrong_is_never_best(built, copy_of, tmp_path):
    path = copy_of(built)
    bundle = Bundle.open(path)
    proto = onnx.load(str(bundle.variant_path("fp32")))
    weight = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * -1.0, weight.name))
    onnx.save(proto, str(tmp_path / "broken.onnx"))
    bundle.add_variant("broken", tmp_path / "broken.onnx", recipe={"stage": "test", "options": {}, "parent": "fp32"}, precision="fp32")
    assert not check(path, variants=["broken"])["broken"]["passed"]

    best = select_best(path, max_time=0.05)
    assert "broken" not in best["p50_ms"] and best["variant"] != "broken"

    # a manifest whose best points at a failing variant is refused at load time
    data = json.loads((path / "manifest.json").read_text())
    data["best"]["variant"] = "broken"
    (path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ToolkitError, match="'best' is variant 'broken', which fails its gates"):
        toolkit.load(path, variant="best")


@pytest.mark.slow
def test_variants_are_timed_all_at_once_only_within_twice_fp32s_size(built, copy_of, monkeypatch):
    """A session holds about twice its file: the variants are timed together where their files add up
    to twice fp32's or a fixed floor, else each beside fp32, with two sessions open at most."""
    from toolkit.compile import pipeline

    path = copy_of(built)
    groups: list[list[str]] = []
    timed = pipeline._time
    monkeypatch.setattr(pipeline, "_time", lambda bundle, variants, *rest: groups.append(list(variants)) or timed(bundle, variants, *rest))
    passing, _ = timed_variants(Bundle.open(path), "cpu")
    select_best(path, max_time=0.02)  # the tiny cnn's variants fit under the floor
    assert groups == [["fp32", *(v for v in passing if v != "fp32")]]
    bundle = Bundle.open(path)
    assert sum(bundle.variant(v).bytes for v in passing) > 2 * bundle.variant("fp32").bytes
    groups.clear()
    monkeypatch.setattr(pipeline, "_TIME_TOGETHER_BYTES", 0)
    best = select_best(path, max_time=0.02)
    assert groups == [["fp32", v] for v in passing if v != "fp32"] and set(best["vs_fp32"]) == set(passing)


def test_best_without_a_build_says_how_to_get_one(exported):
    with pytest.raises(ToolkitError, match="has no 'best' variant recorded: `toolkit build`"):
        toolkit.load(exported("mlp"), variant="best")


@pytest.mark.slow
def test_build_cli_ends_in_a_table_naming_best(cli, tmp_path):
    result = cli("build", "mlp", "--preset", "tiny", "-o", tmp_path / "mlp", "--mode", "int8")
    assert result.exit_code == 0, result.output
    assert "build:" in result.stdout and "best:" in result.stdout
    for name in ("fp32", "opt", "int8"):
        assert name in result.stdout
    assert "fp16" not in Bundle.open(tmp_path / "mlp").manifest.variants


def test_build_refuses_an_unknown_mode(tmp_path):
    from toolkit.compile.pipeline import build

    with pytest.raises(ToolkitError, match="unknown quantization mode 'int2'"):
        build("mlp", tmp_path / "x", preset="tiny", modes=["int2"])
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_int8_is_neither_timed_nor_chosen_on_cuda_and_the_reason_is_recorded(built):
    bundle = Bundle.open(built)
    timed, left_out = timed_variants(bundle, "cuda")
    assert set(left_out) == {"int8", "int8-static"} and "no kernels for int8" in left_out["int8"]
    assert set(timed) == {"fp32", "opt", "fp16"}
    assert timed_variants(bundle, "cpu") == (list(bundle.manifest.variants), {})


@pytest.mark.slow
def test_a_variant_the_quantizer_cannot_make_is_recorded_and_the_build_goes_on(tmp_path, monkeypatch, cli):
    from toolkit.compile import quantization

    def crash(*_args, **_kwargs):  # as onnxruntime's tools fail: a plain exception, not toolkit's
        raise RuntimeError("the fp16 converter crashed")

    monkeypatch.setitem(quantization.HANDLERS, quantization.Fp16, crash)
    result = cli("build", "mlp", "--preset", "tiny", "-o", tmp_path / "b", "--no-select", "--mode", "int8", "--mode", "fp16")
    assert result.exit_code == 0, result.output
    manifest = Bundle.open(tmp_path / "b").manifest
    assert "RuntimeError: the fp16 converter crashed" in manifest.failed["fp16"] and "fp16" not in manifest.variants
    assert manifest.variants["int8"].parity is not None and manifest.variants["opt"].parity["passed"]  # the others were made and checked
    assert "the fp16 converter crashed" in result.stdout and "could not be made" in result.stdout


@pytest.mark.slow
def test_a_decoder_is_timed_on_its_prompt_and_decode_steps(exported, copy_of):
    """Generation spends its time in decode steps: best is chosen on one prompt and on one-token steps
    over a cache, not on a batch of long prompts."""
    path = copy_of(exported("gpt"))
    assert check(path, variants=["fp32"])["fp32"]["passed"]
    best = select_best(path, max_time=0.05)
    assert set(best["p50_ms"]["fp32"]) == {"batch 1, seq 32, past 0", "batch 1, seq 1, past 32", "batch 32, seq 1, past 32"}


@pytest.mark.slow  # builds or exports a model
def test_a_build_runs_the_reference_once_and_records_an_int8_that_changed_nothing(tmp_path, cli):
    """The reference's outputs are gathered by the first check and reused by every later one; a
    file is pre-processed for quantization once; dynamic int8 on a convolution-only model is
    recorded as failed with what would quantize it, and int8-static is made; inspect shows both,
    and best."""
    from toolkit.compile.pipeline import build

    said: list[str] = []
    bundle = build("userpkg.toy:convolutions", tmp_path / "b", modes=["int8", "int8-static"], max_time=0.05, progress=said.append)
    assert sum(m.startswith("running the reference on") for m in said) == 1
    assert sum(m.startswith("pre-processing") for m in said) == 2  # opt (int8), fp32 (int8-static)
    assert "quantized no weights (Conv 0/2)" in bundle.manifest.failed["int8"] and "int8" not in bundle.manifest.variants
    assert bundle.manifest.variants["int8-static"].parity["passed"]
    shown = cli("inspect", bundle.path)
    assert "not made: int8: int8 from variant 'opt' quantized no weights (Conv 0/2)" in shown.stdout
    assert f"best: {bundle.manifest.best['variant']} on cpu" in shown.stdout


def test_the_references_weights_are_mapped_from_a_file_and_compute_the_same(tmp_path):
    """Once the first check has the reference's outputs, a build keeps its weights in a file mapped
    back in (toolkit.compile.pipeline._map_weights), not in its own memory; the model is unchanged."""
    from toolkit.compile.pipeline import BuildContext, _map_weights
    from toolkit.reference.run import run_reference
    from toolkit.reference.source import resolve, source_of
    from toolkit.runtime.samples import make_feeds

    spec = resolve(source_of("gpt", "tiny"), tmp_path)
    feeds = make_feeds(spec.inputs, {d.name: d.export for d in spec.dims}, seed=0)
    before = run_reference(spec, feeds)
    _map_weights(BuildContext(bundle=None, reference=spec, say=lambda _m: None, scratch=tmp_path))
    after = run_reference(spec, feeds)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    mapped = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(tmp_path / "reference-weights-0.pt"):
            low, high = (int(x, 16) for x in fields[0].split("-"))
            mapped.append((low, high))
    parameters = list(spec.module.parameters())
    assert mapped and parameters and all(any(low <= p.data_ptr() < high for low, high in mapped) for p in parameters)
