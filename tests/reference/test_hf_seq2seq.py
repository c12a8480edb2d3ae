"""Hugging Face encoder-decoders (models/hf_heads.py: BART and T5 over text, Whisper over log-mel
features) exported as the zoo seq2seq is: the decoder with its KV cache as the bundle, the encoder as
its part; greedy tokens identical to transformers' generate(), alone and in a batch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from models.hf_heads import hf_model
from toolkit import Generator
from toolkit.bundle import Bundle
from toolkit.errors import ToolkitError
from toolkit.runtime.generate import greedy_tokens

from .greedy import PROMPTS, until_eos

pytest.importorskip("transformers", reason="hf: models need transformers (pip install -e '.[test]')")
SEQ2SEQ = ("bart", "t5", "whisper")
NEW_TOKENS = 24


def _clips(rows: int) -> np.ndarray:
    from toolkit.reference.hf import hf_spec

    return hf_spec(hf_model("whisper")).parts["encoder"].sample_data(rows)["input_features"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", SEQ2SEQ)
def test_greedy_tokens_equal_transformers_generate_alone_and_in_a_batch(exported, kind):
    """transformers' generate() with the model's own generation config (BART's forced end token,
    Whisper's suppressed tokens) against the Generator over the exported graphs."""
    import torch
    import transformers

    path = hf_model(kind)
    generator = Generator(exported(f"hf:{path}", None), provider="cpu")
    eos = generator.layout.eos_ids
    if kind == "whisper":
        model = transformers.WhisperForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
        prompts = list(_clips(3))
        want = model.generate(torch.from_numpy(np.stack(prompts)), max_new_tokens=NEW_TOKENS, do_sample=False).numpy()
        alone = [model.generate(torch.from_numpy(p[None]), max_new_tokens=NEW_TOKENS, do_sample=False).numpy()[0] for p in prompts]
    else:
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(path, attn_implementation="eager").eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        prompts = [generator.tokenizer.encode(p, special_tokens=True) for p in PROMPTS]
        assert prompts == [tokenizer(p)["input_ids"] for p in PROMPTS]
        longest = max(map(len, prompts))
        ids = torch.tensor([p + [eos[0]] * (longest - len(p)) for p in prompts])
        mask = torch.tensor([[1] * len(p) + [0] * (longest - len(p)) for p in prompts])
        start = len(generator.layout.decoder_start)  # transformers returns the decoder's start tokens too
        want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1).numpy()[:, start:]
        alone = [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1).numpy()[0, start:]
                 for p in prompts]
    assert len({tuple(until_eos(row, eos)) for row in want}) > 1  # the prompts lead to different tokens
    for prompt, expected in zip(prompts, alone, strict=True):
        assert until_eos(greedy_tokens(generator, [prompt], NEW_TOKENS)[0], eos) == until_eos(expected, eos)
    for row, expected in zip(greedy_tokens(generator, prompts, NEW_TOKENS), want, strict=True):
        assert until_eos(row, eos) == until_eos(expected, eos)


@pytest.mark.slow
def test_the_manifest_describes_the_decoder_its_cache_its_encoder_and_the_generation_rules(exported):
    manifest = Bundle.open(exported(f"hf:{hf_model('bart')}", None)).manifest
    assert manifest.task == "generate" and list(manifest.parts) == ["encoder"]
    assert [t.name for t in manifest.inputs[:4]] == ["input_ids", "attention_mask", "source_mask", "past_key_0"]
    assert manifest.inputs[3].shape == ("batch", 2, "past", 16) and manifest.inputs[-1].name == "memory_value_0"
    assert manifest.inputs[-1].shape == ("batch", 2, "source", 16)
    generation = manifest.generation
    assert generation["decoder_start"] == [generation["eos_token_id"]] and generation["forced_eos_token_id"] == generation["eos_token_id"]
    assert generation["source_special_tokens"] and "tokenizer.json" in manifest.assets


@pytest.mark.slow
def test_a_speech_model_takes_features_and_says_what_shape_when_given_anything_else(exported, tmp_path):
    bundle = exported(f"hf:{hf_model('whisper')}", None)
    manifest = Bundle.open(bundle).manifest
    assert "source_mask" not in {t.name for t in manifest.inputs} and manifest.inputs[-1].shape == ("batch", 2, 50, 16)
    generator = Generator(bundle, provider="cpu")
    with pytest.raises(ToolkitError, match=r"speech model; a prompt is its encoder's input_features, a float array \(16, 100\).*got str"):
        generator.generate("hello")
    with pytest.raises(ToolkitError, match=r"got an array \(16, 99\) float32"):
        generator.generate(np.zeros((16, 99), np.float32))
    clips = _clips(2)
    with pytest.raises(ToolkitError, match=r"max_new_tokens 64 is beyond what the model's decoder holds \(63 tokens after its start tokens\)"):
        generator.generate(clips[0], max_new_tokens=64)
    with pytest.raises(ToolkitError, match=r"prompt 2 of 2: .* got an array \(16, 50\) float32"):
        greedy_tokens(generator, [clips[0], clips[1][:, :50]], 4)
    np.save(tmp_path / "clips.npy", clips)
    texts = generator.generate(clips, max_new_tokens=8)
    result = subprocess.run([sys.executable, "-m", "toolkit.cli", "generate", str(bundle), "--features", str(tmp_path / "clips.npy"),
                             "-n", "8"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n---\n")[0].strip() == texts[0].strip()
    refused = subprocess.run([sys.executable, "-m", "toolkit.cli", "generate", str(bundle), "-p", "hello"], capture_output=True, text=True)
    assert refused.returncode != 0 and "give its prompt as --features FILE.npy" in refused.stderr


@pytest.mark.slow
def test_a_speech_encoder_decoder_builds_with_parity(tmp_path):
    """export, check and build: fp32, the fused graph and int8 pass their gates, greedy tokens
    included (every architecture's whole build: benchmarks/breadth.py)."""
    from toolkit.compile.pipeline import build

    bundle = build(f"hf:{hf_model('whisper')}", tmp_path / "whisper", select=False, modes=["int8"])
    variants = bundle.manifest.variants
    for name in ("fp32", "opt", "int8"):
        assert variants[name].parity["passed"], variants[name].parity
        assert variants[name].parity["parts"]["encoder"]["passed"]


def test_text_sources_are_tokenized_as_the_model_reads_them_and_the_encoder_feeds_the_decoder():
    """The reference pair, without exporting: T5's encoder gives each decoder layer its
    cross-attention keys and values, and a decoder step over them matches the whole model's logits."""
    import torch
    import transformers

    from toolkit.reference.hf import hf_spec
    from toolkit.reference.run import run_reference

    path = hf_model("t5")
    spec = hf_spec(path)
    encoder = spec.parts["encoder"]
    sources = encoder.sample_data(3)
    memory = run_reference(encoder, sources)
    assert list(memory) == [f"memory_{kind}_{i}" for i in range(2) for kind in ("key", "value")]
    ids = np.array([[spec.generation["decoder_start"][0], 5, 9]] * 3)
    empty = np.zeros((3, 2, 0, 16), np.float32)
    step = run_reference(spec, {"input_ids": ids, "attention_mask": np.ones_like(ids), "source_mask": sources["source_mask"],
                                **{f"past_{k}_{i}": empty for i in range(2) for k in ("key", "value")}, **memory})
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.inference_mode():
        whole = model(input_ids=torch.from_numpy(sources["source_ids"]), attention_mask=torch.from_numpy(sources["source_mask"]),
                      decoder_input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(step["logits"], whole, rtol=1e-4, atol=1e-5)


def test_generation_rules_force_and_suppress_tokens_as_transformers_does():
    from toolkit.runtime.generate import TokenRules

    rules = TokenRules.of({"forced_bos_token_id": 3, "forced_eos_token_id": [1, 2], "suppress_tokens": [4], "begin_suppress_tokens": [0]})
    logits = np.zeros((2, 6))
    logits[:, 0] = logits[:, 4] = 9.0
    assert rules.apply(logits, 0, False).argmax(-1).tolist() == [3, 3]  # forced first
    assert rules.apply(logits, 1, False).argmax(-1).tolist() == [0, 0]  # 4 suppressed always; 0 only first
    assert rules.apply(logits, 5, True).argmax(-1).tolist() == [1, 1]  # forced last
    assert np.isneginf(rules.apply(logits, 1, False)[:, 4]).all() and logits[0, 4] == 9.0  # the caller's logits untouched
