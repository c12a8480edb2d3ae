"""Hugging Face causal LMs exported as decoders with a KV cache through transformers' own cache
class: greedy tokens identical to transformers' generate(), their tokenizer in the bundle, and an
optimized graph that onnxruntime loads."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from models.hf_causal import ARCHITECTURES, causal_lm
from toolkit import Generator
from toolkit.bundle import Bundle
from toolkit.errors import ToolkitError
from toolkit.runtime.generate import greedy_tokens

from .greedy import PROMPTS, until_eos

pytest.importorskip("transformers", reason="hf: models need transformers (pip install -e '.[test]')")
NEW_TOKENS = 64


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
        assert until_eos(greedy_tokens(generator, [prompt], NEW_TOKENS)[0], eos) == until_eos(want[0], eos)
    longest = max(map(len, prompts))
    want = reference([[eos[0]] * (longest - len(p)) + p for p in prompts], [[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    got = greedy_tokens(generator, prompts, NEW_TOKENS)
    for row, expected in zip(got, want, strict=True):
        assert until_eos(row, eos) == until_eos(expected, eos)


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


@pytest.mark.parametrize("kind", [k if k == "llama" else pytest.param(k, marks=pytest.mark.slow) for k in ARCHITECTURES])
def test_the_optimized_graph_loads_and_keeps_greedy_parity(exported, copy_of, kind):
    """The fused graph loads and greedy tokens on the check's left-padded prompts stay PyTorch's.
    Rotary models: every layer's queries and keys rotate in one RotaryEmbedding, and its attention
    over the cache becomes one ONNX Attention. GPT-2: each layer's attention becomes a
    MultiHeadAttention with its cache, and the Gemm that onnxscript's fusion leaves on its 3-D
    output is made a MatMul."""
    import transformers

    from toolkit.compile import check, optimize

    path = copy_of(exported(f"hf:{causal_lm(kind)}", None))
    optimize(path)
    options = Bundle.open(path).manifest.variants["opt"].recipe["options"]
    fusion = options["fusion"]
    assert "GroupQueryAttention" not in (fusion or {}).get("fused", {})  # its CPU kernel reads the mask as right padding
    layers = transformers.AutoConfig.from_pretrained(causal_lm(kind)).num_hidden_layers
    assert options["passes"]["rotary embeddings fused"] == (0 if kind == "gpt2" else 2 * layers)  # queries and keys, Phi's partial too
    # grouped-query attention over the cache, as GPT-2's became MultiHeadAttention in the fusion
    assert options["passes"]["attention over a cache fused"] == (0 if kind == "gpt2" else layers)
    if kind in ("llama", "mistral", "qwen2"):  # whole-head rotary: attention on the projections' rows, no head transposes
        import onnx

        assert "Transpose" not in [n.op_type for n in onnx.load(str(Bundle.open(path).variant_path("opt"))).graph.node]
    if kind == "gpt2":
        assert fusion["fused"]["MultiHeadAttention"] == 2 and fusion["repaired"] == {"Gemm after attention to MatMul": 2}
    record = check(path, variants=["opt"], trust_source=True)["opt"]
    assert record["passed"], record
    assert record["greedy"]["token_agreement"] == 1.0
    if kind == "gpt2":  # the in-place rewrite takes ONNX Attention only
        assert "onnxruntime's MultiHeadAttention" in record["greedy_inplace"]["not_applied"]
    else:  # what a Generator opened on the bundle runs on the CPU
        assert record["greedy_inplace"].get("token_agreement") == 1.0, record["greedy_inplace"]


@pytest.fixture(scope="module")
def llama_opt(exported, tmp_path_factory):
    import shutil

    from toolkit.compile import optimize

    path = tmp_path_factory.mktemp("inplace") / "llama"
    shutil.copytree(exported(f"hf:{causal_lm('llama')}", None), path)
    optimize(path)
    return path


def test_the_in_place_cache_gives_the_growing_caches_tokens(llama_opt):
    """On the CPU, a Generator opened on a fused variant writes every step into one cache allocated
    per call: the growing cache's greedy tokens, alone and in a left-padded batch (the rewrite reads
    the past length from the mask, since the buffer's is the whole allocation). It holds one session:
    the bundle graph's is released. Given a Model, it keeps the Model's graph unless asked."""
    from toolkit import Model

    inplace = Generator(llama_opt, variant="opt", provider="cpu")
    growing = Generator(llama_opt, variant="opt", provider="cpu", cache="growing")
    assert (inplace.decode, inplace.note, growing.decode) == ("inplace", "", "growing")
    assert inplace.model.session is None and growing.model.session is not None
    with pytest.raises(ToolkitError, match=r"is closed: its session was released"):
        inplace.model.run({})
    prompts = [inplace.tokenizer.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) > 1
    for batch in (prompts, prompts[:1], prompts[1:]):
        np.testing.assert_array_equal(greedy_tokens(inplace, batch, NEW_TOKENS), greedy_tokens(growing, batch, NEW_TOKENS))
    shared = Model(llama_opt, variant="opt", provider="cpu")
    assert (Generator(shared).decode, Generator(shared, cache="inplace").decode) == ("growing", "inplace")
    assert shared.session is not None


def test_the_in_place_graph_writes_one_step_into_the_cache_it_is_given(llama_opt):
    """The rewritten graph, run once over a bound buffer holding a past of 5 positions: the step's
    keys land at position 5 of the same buffer, nothing after it changes, and its logits are the
    bundle graph's over the same past to fp32 rounding."""
    import onnxruntime as ort

    from toolkit import Model
    from toolkit.runtime.inplace import SEQLENS, inplace_graph

    model = Model(llama_opt, variant="opt", provider="cpu")
    proto, why = inplace_graph(model.bundle.variant_path("opt"))
    assert why == "" and {n.op_type for n in proto.graph.node} >= {"GroupQueryAttention"} and "Attention" not in {n.op_type for n in proto.graph.node}
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    past = {t.name: t for t in model.inputs if t.name.startswith("past_")}
    _, heads, _, size = next(iter(past.values())).shape
    rng = np.random.default_rng(0)
    values = {name: rng.standard_normal((1, heads, 5, size)).astype(np.float32) for name in past}
    step = {"input_ids": np.array([[7]]), "attention_mask": np.ones((1, 6), np.int64), "position_ids": np.array([[5]])}
    want = model.run(step | values)
    buffers = {name: np.zeros((1, heads, 9, size), np.float32) for name in past}
    binding = session.io_binding()
    for name, value in values.items():
        buffers[name][:, :, :5] = value
        buffer = ort.OrtValue.ortvalue_from_numpy(buffers[name])
        binding.bind_ortvalue_input(name, buffer)
        binding.bind_ortvalue_output("present_" + name.removeprefix("past_"), buffer)
        buffers[name] = buffer
    for name, value in (step | {SEQLENS: np.array([5], np.int32)}).items():  # the row's length after the step, minus one
        binding.bind_cpu_input(name, value)
    binding.bind_output("logits", "cpu")
    session.run_with_iobinding(binding)
    np.testing.assert_allclose(binding.get_outputs()[-1].numpy(), want["logits"], rtol=0, atol=1e-4)
    for name in past:
        written = buffers[name].numpy()
        np.testing.assert_array_equal(written[:, :, :5], values[name])
        np.testing.assert_allclose(written[:, :, 5], want["present_" + name.removeprefix("past_")][:, :, 5], atol=1e-5)
        assert not written[:, :, 6:].any()


def test_the_in_place_rewrite_says_why_it_does_not_apply(exported):
    from toolkit.runtime.inplace import inplace_graph

    unfused = Bundle.open(exported(f"hf:{causal_lm('llama')}", None)).variant_path("fp32")
    assert inplace_graph(unfused) == (None, "its attention is not fused (the fused variants opt, int8 and int4 of a rotary decoder have it)")
    generator = Generator(exported(f"hf:{causal_lm('llama')}", None), provider="cpu")
    assert generator.decode == "growing" and generator.note.startswith("in-place cache not used: its attention is not fused")
    with pytest.raises(Exception, match=r"cache 'inplace' does not apply to .* \(fp32\): its attention is not fused"):
        Generator(exported(f"hf:{causal_lm('llama')}", None), provider="cpu", cache="inplace")


@pytest.mark.parametrize("kind", ["llama", *(pytest.param(k, marks=pytest.mark.slow) for k in ("mistral", "qwen2", "phi"))])
def test_grouped_query_attention_reads_the_cache_without_copying_it(exported, kind):
    """Grouped-query models attend with the query heads stacked per key-value head: the same logits,
    bit for bit, as transformers' eager attention, and no Expand of the cache in the graph."""
    import onnx
    import torch
    import transformers

    from toolkit.reference.hf import hf_spec

    path = causal_lm(kind)
    spec = hf_spec(path)
    assert spec.module.model.config._attn_implementation == "toolkit_grouped_eager"
    eager = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ids = torch.randint(1, 300, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    with torch.inference_mode():
        assert torch.equal(spec.module.model(input_ids=ids, attention_mask=mask).logits, eager(input_ids=ids, attention_mask=mask).logits)
    graph = onnx.load(str(Bundle.open(exported(f"hf:{path}", None)).variant_path("fp32"))).graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in graph.value_info}
    assert not [n.name for n in graph.node if n.op_type == "Expand" and ranks.get(n.output[0]) == 5]  # repeat_kv's


def test_a_decoder_whose_tokenizer_cannot_load_is_refused_before_any_work(tmp_path):
    import shutil

    from toolkit.errors import ToolkitError
    from toolkit.reference.hf import hf_spec

    model = tmp_path / "model"
    shutil.copytree(causal_lm("llama"), model)
    (model / "tokenizer.json").unlink()
    with pytest.raises(ToolkitError, match=r"transformers cannot load its tokenizer: "):
        hf_spec(model)


def test_stream_decoding_holds_back_a_character_until_it_is_whole():
    from toolkit.runtime.tokenizer import HFTokenizer

    tokenizer = HFTokenizer(causal_lm("llama") / "tokenizer.json", [0])
    ids = tokenizer.encode("naïve café ✓")
    stream = tokenizer.stream_decoder()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == "naïve café ✓" and all("\ufffd" not in p for p in pieces)
    assert np.isscalar(ids[0])


@pytest.mark.slow
def test_int8_and_int4_from_the_fused_graph_keep_its_attention(exported, copy_of):
    """Quantized from opt, whose attention is ONNX's `Attention`: the dynamic quantizer, which takes
    any `Attention` for onnxruntime's (the QKV weight its second input), leaves it as it is, only
    the MatMuls become int8 or 4-bit, and both variants pass their check."""
    import onnx
    import transformers

    from toolkit.compile import check, optimize, quantize

    path = copy_of(exported(f"hf:{causal_lm('llama')}", None))
    optimize(path)
    layers = transformers.AutoConfig.from_pretrained(causal_lm("llama")).num_hidden_layers
    for mode in ("int8", "int4"):
        quantize(path, mode=mode, source="opt", trust_source=True)
        ops = [n.op_type for n in onnx.load(str(Bundle.open(path).variant_path(mode)), load_external_data=False).graph.node]
        assert ops.count("Attention") == layers and "QAttention" not in ops
        assert {"int8": {"DynamicQuantizeMatMul", "MatMulInteger"}, "int4": {"MatMulNBits"}}[mode] & set(ops)
        record = check(path, variants=[mode], trust_source=True)[mode]
        assert record["passed"] and "greedy" in record, record


@pytest.mark.slow
def test_the_in_place_cache_reads_weights_kept_beside_the_graph(tmp_path, monkeypatch):
    """A variant whose weights are in external files (large models): the rewritten graph reads them
    where the bundle keeps them, and decodes the growing cache's tokens."""
    from toolkit.compile import optimize
    from toolkit.compile.exporter import export

    monkeypatch.setenv("TOOLKIT_EXTERNAL_DATA_BYTES", "1000")
    path = tmp_path / "llama"
    export(f"hf:{causal_lm('llama')}", path)
    optimize(path)
    assert (path / "model.opt.onnx.data").is_file()
    inplace, growing = Generator(path, variant="opt", provider="cpu"), Generator(path, variant="opt", provider="cpu", cache="growing")
    assert inplace.decode == "inplace"
    prompts = [inplace.tokenizer.encode(p) for p in PROMPTS]
    np.testing.assert_array_equal(greedy_tokens(inplace, prompts, 16), greedy_tokens(growing, prompts, 16))
