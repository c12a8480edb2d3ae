"""Stage prune: structured pruning keeps the model's interface, its bundle rebuilds the pruned
reference from data, and bad input is refused before anything is written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toolkit.bundle import Bundle, Source
from toolkit.compile.exporter import _example_args
from toolkit.compile.prune import _prune_module, prune
from toolkit.errors import ToolkitError
from toolkit.reference import pruned
from toolkit.reference.run import run_reference
from toolkit.reference.source import bundle_reference, resolve, source_of, weights_sha256


def _zoo(name: str):
    return resolve(Source("zoo", model=name, preset="tiny"))


def _outputs(spec) -> list[torch.Tensor]:
    with torch.inference_mode():
        result = spec.module(*_example_args(spec))
    return list(result) if isinstance(result, (tuple, list)) else [result]


@pytest.mark.parametrize("name", ["mlp", "cnn", "lstm", "encoder", "gpt", "seq2seq"])
def test_pruning_keeps_every_graphs_outputs_and_its_structure_survives_a_rebuild(name, tmp_path):
    spec = _zoo(name)
    before = pruned.attributes(spec.module)
    shapes = [[t.shape for t in _outputs(g)] for g in (spec, *spec.parts.values())]
    record = _prune_module(spec, 0.5, "l1", lambda _m: None)
    assert record["removed"], record
    assert [[t.shape for t in _outputs(g)] for g in (spec, *spec.parts.values())] == shapes
    # the structure as data: a fresh build of the source with it applied is the same model
    pruned.save(spec.module, before, tmp_path / pruned.FILE)
    rebuilt = _zoo(name)
    pruned.apply(rebuilt.module, pruned.load(tmp_path / pruned.FILE, _sha(tmp_path / pruned.FILE)))
    assert weights_sha256(rebuilt.module) == weights_sha256(spec.module)
    for want, got in zip(_outputs(spec), _outputs(rebuilt), strict=True):
        assert torch.equal(want, got)


def _sha(path):
    from toolkit.bundle import sha256_file

    return sha256_file(path)


def test_what_is_pruned_and_what_stays_whole_with_its_reason():
    encoder = _zoo("encoder")
    record = _prune_module(encoder, 0.5, "l1", lambda _m: None)
    assert record["removed"]["blocks.0.attn"]["heads"] == [2, 1]  # heads go whole, by the module's own hooks
    assert record["removed"]["blocks.0.attn.qkv"]["out_features"] == [192, 96]
    assert record["removed"]["blocks.0.ffn.0"]["out_features"] == [128, 64]
    assert "reach a graph output" in record["kept"]["classifier"]
    assert encoder.module.blocks[0].attn.heads == 1

    gpt = _zoo("gpt")
    record = _prune_module(gpt, 0.5, "taylor", lambda _m: None)
    assert "KV cache" in record["kept"]["gpt.blocks.0.attn"]  # the cache layout is the bundle's interface
    assert record["removed"]["gpt.blocks.0.mlp.fc"]["out_features"] == [256, 128]
    assert record["removed"]["gpt.wte"]["embedding_dim"] == [64, 32]  # the residual width, through the tied head
    assert gpt.module.gpt.lm_head.weight is gpt.module.gpt.wte.weight  # still tied

    seq2seq = _zoo("seq2seq")  # its decoder adds sinusoids of the configured width: that width stays
    record = _prune_module(seq2seq, 0.5, "l1", lambda _m: None)
    assert any("forward fails without them" in reason and "size of tensor" in reason for reason in record["kept"].values()), record["kept"]
    assert seq2seq.module.model.embed.embedding_dim == 64

    lstm = _zoo("lstm")
    _prune_module(lstm, 0.25, "l1", lambda _m: None)
    layer = lstm.module.lstm
    assert layer.hidden_size == 24 and layer.weight_hh_l1.shape == (96, 24) and layer.weight_ih_l1.shape == (96, 24)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert-sequence", "bart", "vit"])
def test_hugging_face_models_prune_and_rebuild_from_their_structure(kind, tmp_path):
    from models.hf_causal import causal_lm
    from models.hf_heads import hf_model

    source = source_of(f"hf:{causal_lm(kind) if kind in ('llama', 'gpt2') else hf_model(kind)}", None)
    spec = resolve(source)
    before = pruned.attributes(spec.module)
    graphs = (spec, *spec.parts.values())
    shapes = [[t.shape for t in _outputs(g)] for g in graphs]
    record = _prune_module(spec, 0.5, "l1", lambda _m: None)
    assert record["removed"] and [[t.shape for t in _outputs(g)] for g in graphs] == shapes
    pruned.save(spec.module, before, tmp_path / pruned.FILE)
    rebuilt = resolve(source)
    pruned.apply(rebuilt.module, pruned.load(tmp_path / pruned.FILE, _sha(tmp_path / pruned.FILE)))
    for graph, again in zip(graphs, (rebuilt, *rebuilt.parts.values()), strict=True):
        for want, got in zip(_outputs(graph), _outputs(again), strict=True):
            assert torch.equal(want, got)
    if kind == "llama":  # RMSNorm's weight is no layer Torch-Pruning knows: recorded by its shapes
        assert record["removed"]["model.model.norm"]["weights"] == ["64", "32"]
    if kind == "gpt2":  # transformers' Conv1D, pruned as the Linear it computes, stays a Conv1D
        mlp = spec.module.model.transformer.h[0].mlp
        before, after = record["removed"]["model.transformer.h.0.mlp.c_fc"]["nf"]
        assert type(mlp.c_fc).__name__ == "Conv1D" and mlp.c_fc.nf == after < before
        assert mlp.c_fc.weight.shape == (mlp.c_fc.nx, mlp.c_fc.nf)
    if kind == "bart":  # the encoder's and decoder's shared embedding: pruning one side alone would untie it
        assert any("untie the weights" in reason for reason in record["kept"].values()), record["kept"]
        model = spec.module.model.model
        assert model.encoder.embed_tokens.weight is model.decoder.embed_tokens.weight


def test_torchs_multihead_attention_is_pruned_with_its_width_and_reported_as_pruned():
    spec = resolve(Source("factory", ref="tests.userpkg.toy:torch_encoder"))
    record = _prune_module(spec, 0.5, "l1", lambda _m: None)
    assert record["removed"]["encoder.layers.0.self_attn"]["embed_dim"] == [32, 16]
    assert not any("not this layer type" in reason for reason in record["kept"].values()), record["kept"]
    assert _outputs(spec)[0].shape == (2, 5)


def test_a_layer_type_toolkit_cannot_prune_is_named_in_the_refusal(tmp_path):
    with pytest.raises(ToolkitError, match=r"nothing in tests.userpkg.toy:mixers can be pruned: 0, 1: a Mixer: toolkit prunes nn.Linear"):
        prune("tests.userpkg.toy:mixers", tmp_path / "out", amount=0.5)
    assert not (tmp_path / "out").exists()


def test_round_to_leaves_every_pruned_group_a_multiple_of_its_channels():
    cnn = _zoo("cnn")  # 8 and 16 channels: a quarter off would leave 6 and 12
    record = _prune_module(cnn, 0.25, "l1", lambda _m: None, round_to=8)
    assert "features.0" not in record["removed"] and cnn.module.features[0].out_channels == 8  # 8 or fewer: whole
    assert record["removed"]["features.3"]["out_channels"] == [16, 8]
    mlp = _zoo("mlp")  # 32 units: a group of at most 32 rounded to 32 stays whole
    assert _prune_module(mlp, 0.25, "l1", lambda _m: None, round_to=32)["removed"] == {}


def test_a_pruned_bundle_rebuilds_its_reference_from_the_bundle_and_passes_parity(tmp_path):
    bundle = prune("mlp", tmp_path / "pruned", amount=0.5, preset="tiny")
    manifest = bundle.manifest
    assert manifest.source.pruned == pruned.FILE and (bundle.path / pruned.FILE).is_file()
    assert manifest.variants["fp32"].parity["passed"]
    record = manifest.pruning
    assert record["removed"]["body.0"]["out_features"] == [32, 16]
    assert record["params"][1] < 0.6 * record["params"][0] and record["macs"][1] < 0.6 * record["macs"][0]
    tuned = record["fine_tune"]
    assert tuned["epochs"] > 0 and tuned["metric"] == "test_accuracy" and 0 < tuned["pruned"] <= 1
    assert tuned["fine_tuned"] == pytest.approx(record["gate"]["accuracy"]["pruned"])  # the recipe's test set is the gate's
    gate = record["gate"]
    assert gate["accuracy"]["drop"] == pytest.approx(gate["accuracy"]["unpruned"] - gate["accuracy"]["pruned"])
    assert gate["passed"] == (gate["accuracy"]["drop"] <= gate["tolerance"]["max_accuracy_drop"])
    reference = bundle_reference(Bundle.open(bundle.path))
    assert reference.module.body[0].out_features == 16
    feeds = {"x": np.random.default_rng(0).random((3, 784), dtype=np.float32)}
    import toolkit

    got = toolkit.load(bundle.path).run(feeds)["logits"]
    np.testing.assert_allclose(got, run_reference(reference, feeds)["logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # it prunes and exports a model of its own (the fast tier has the pruned bundle tests above)
def test_an_altered_pruned_structure_is_refused(tmp_path):
    path = prune("mlp", tmp_path / "pruned", amount=0.25, preset="tiny", fine_tune=False).path
    with open(path / pruned.FILE, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(ToolkitError, match="sha256 differs"):
        bundle_reference(Bundle.open(path))


@pytest.mark.parametrize("amount", [0, 1, -0.2, 1.5])
def test_an_amount_outside_zero_to_one_is_refused_and_the_bundle_is_left_as_it_was(amount, tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ToolkitError, match="out of range"):
        prune("mlp", target, amount=amount, preset="tiny", force=True)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_a_model_with_nothing_prunable_is_refused_naming_what_stays_whole(tmp_path):
    with pytest.raises(ToolkitError, match="nothing in tests.userpkg.toy:build can be pruned.*proj: its output channels reach a graph output"):
        prune("tests.userpkg.toy:build", tmp_path / "out", amount=0.5)
    assert not (tmp_path / "out").exists()


def test_a_model_torch_pruning_cannot_trace_is_refused_naming_it_and_the_bundle_is_left_as_it_was(tmp_path, monkeypatch):
    import torch_pruning as tp

    def untraceable(*_args, **_kwargs):
        raise RuntimeError("no autograd graph")

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", untraceable)
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ToolkitError, match=r"Torch-Pruning could not prune mlp preset tiny: RuntimeError: no autograd graph"):
        prune("mlp", target, amount=0.5, preset="tiny", force=True)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_an_unknown_method_or_a_round_to_below_one_is_refused(tmp_path):
    with pytest.raises(ToolkitError, match="unknown pruning method 'random'"):
        prune("mlp", tmp_path / "out", amount=0.5, method="random", preset="tiny")
    with pytest.raises(ToolkitError, match="--round-to 0 is out of range"):
        prune("mlp", tmp_path / "out", amount=0.5, round_to=0, preset="tiny")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn", "lstm", "encoder", "gpt", "seq2seq"])
def test_zoo_models_prune_to_bundles_that_pass_parity_against_the_pruned_model(name, tmp_path, cli):
    result = cli("prune", name, "--preset", "tiny", "--amount", "0.25", "--method", "taylor", "-o", tmp_path / name)
    manifest = Bundle.open(tmp_path / name).manifest
    assert manifest.variants["fp32"].parity["passed"], manifest.variants["fp32"].parity["errors"]
    assert manifest.pruning["removed"] and manifest.pruning["method"] == "taylor"
    assert "task gate against the unpruned model" in result.output
    assert result.exit_code == (0 if manifest.pruning["gate"]["passed"] else 1)
    for part in manifest.parts:  # each part's bundle carries the structure too
        assert (tmp_path / name / part / pruned.FILE).is_file()


def test_cli_refuses_a_bad_amount(cli, tmp_path):
    result = cli("prune", "mlp", "--preset", "tiny", "--amount", "1.5", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "out of range" in result.output
    assert not (tmp_path / "out").exists()
