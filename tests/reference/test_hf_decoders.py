"""Hugging Face causal LMs exported as decoders with a KV cache through transformers' own cache
class: greedy tokens identical to transformers' generate(), their tokenizer in the bundle, and an
optimized graph that onnxruntime loads."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.reference.hf_models import ARCHITECTURES, causal_lm
from toolkit import Generator
from toolkit.bundle import Bundle
from toolkit.runtime.generate import greedy_tokens

pytest.importorskip("transformers", reason="hf: models need transformers (pip install -e '.[test]')")
PROMPTS = ["Return the value of", "If the", "Raise ValueError when the argument is not a"]
NEW_TOKENS = 64


def _until_eos(row, eos):
    ids = [int(t) for t in row]
    ends = [i for i, t in enumerate(ids) if t in eos]
    return ids[: ends[0] + 1] if ends else ids


@pytest.mark.parametrize("kind", [k if k == "llama" else pytest.param(k, marks=pytest.mark.slow) for k in ARCHITECTURES])
def test_greedy_tokens_equal_transformers_generate_alone_and_in_a_left_padded_batch(exported, kind):
    import torch
    import transformers

    path = causal_lm(kind)
    generator = Generator(exported(f"hf:{path}", None), provider="cpu")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    eos = generator.layout.eos_ids
    prompts = [generator.tokenizer.encode(p) for p in PROMPTS]

    def reference(ids, mask):
        out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=eos[0])
        return out[:, len(ids[0]):].numpy()

    for prompt in prompts:
        want = reference([prompt], [[1] * len(prompt)])
        assert _until_eos(greedy_tokens(generator, [prompt], NEW_TOKENS)[0], eos) == _until_eos(want[0], eos)
    longest = max(map(len, prompts))
    want = reference([[eos[0]] * (longest - len(p)) + p for p in prompts], [[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    got = greedy_tokens(generator, prompts, NEW_TOKENS)
    for row, expected in zip(got, want, strict=True):
        assert _until_eos(row, eos) == _until_eos(expected, eos)


def test_the_manifest_describes_a_decoder_with_its_cache_and_tokenizer(exported):
    path = causal_lm("llama")
    manifest = Bundle.open(exported(f"hf:{path}", None)).manifest
    assert manifest.task == "generate" and manifest.generation["tokenizer"] == "hf"
    assert [t.name for t in manifest.inputs[:4]] == ["input_ids", "attention_mask", "position_ids", "past_key_0"]
    assert manifest.inputs[3].shape == ("batch", 2, "past", 16)  # grouped-query attention: 2 key-value heads of 4
    assert manifest.inputs[1].shape == ("batch", "past+seq") and "tokenizer.json" in manifest.assets


def test_generation_needs_neither_torch_nor_transformers(exported):
    bundle = exported(f"hf:{causal_lm('llama')}", None)
    code = ("import sys; sys.modules['torch'] = sys.modules['transformers'] = None\n"
            "import toolkit\n"
            f"g = toolkit.Generator({str(bundle)!r}, provider='cpu')\n"
            "print(repr(g.generate('If the', max_new_tokens=8)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("'")


@pytest.mark.slow
def test_gpt2s_fused_graph_loads_and_keeps_parity(exported, copy_of):
    """onnxscript's attention fusion feeds GPT-2's addmm projection a 3-D tensor; the repair rule
    makes it a MatMul, so `opt` keeps its fused attention and loads."""
    from toolkit.compile import check, optimize

    path = copy_of(exported(f"hf:{causal_lm('gpt2')}", None))
    optimize(path)
    fusion = Bundle.open(path).manifest.variants["opt"].recipe["options"]["fusion"]
    assert fusion["fused"]["MultiHeadAttention"] == 2 and fusion["repaired"] == {"Gemm after attention to MatMul": 2}
    record = check(path, variants=["opt"])["opt"]
    assert record["passed"], record
    assert record["greedy"]["token_agreement"] == 1.0


def test_a_decoder_whose_tokenizer_cannot_load_is_refused_before_any_work(tmp_path):
    import shutil

    from toolkit.errors import ToolkitError
    from toolkit.reference.hf import hf_spec

    model = tmp_path / "model"
    shutil.copytree(causal_lm("llama"), model)
    (model / "tokenizer.json").unlink()
    with pytest.raises(ToolkitError, match=r"transformers cannot load it: .*tokenizer"):
        hf_spec(model)


def test_stream_decoding_holds_back_a_character_until_it_is_whole():
    from toolkit.runtime.tokenizer import HFTokenizer

    tokenizer = HFTokenizer(causal_lm("llama") / "tokenizer.json", [0])
    ids = tokenizer.encode("naïve café ✓")
    stream = tokenizer.stream_decoder()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == "naïve café ✓" and all("\ufffd" not in p for p in pieces)
    assert np.isscalar(ids[0])
