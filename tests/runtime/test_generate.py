"""Generation: the KV-cache decoder graph against its PyTorch reference, token for token; sampling,
stop strings, streaming, left-padded batches, and the errors users hit."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit import Generator, Sampling, ToolkitError
from toolkit.bundle import Bundle
from toolkit.reference.run import reference_generator
from toolkit.runtime.generate import greedy_tokens, token_agreement
from toolkit.runtime.model import Model
from toolkit.runtime.samples import make_feeds

PROMPTS = ["Return the value of", "If the", "Raise ValueError when the argument is not a"]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def gpt(exported):
    return exported("gpt")


@pytest.fixture(scope="module")
def generators(gpt):
    return Generator(gpt, provider="cpu"), reference_generator(gpt)


def _ids(generator, prompts):
    return [generator.tokenizer.encode(p) for p in prompts]


def test_greedy_tokens_match_torch_one_prompt_at_a_time(generators):
    onnx, torch = generators
    for prompt in _ids(onnx, PROMPTS):
        np.testing.assert_array_equal(greedy_tokens(onnx, [prompt], NEW_TOKENS), greedy_tokens(torch, [prompt], NEW_TOKENS))


def test_greedy_tokens_match_torch_in_a_left_padded_batch_and_alone(generators):
    onnx, torch = generators
    prompts = _ids(onnx, PROMPTS)
    batch = greedy_tokens(onnx, prompts, NEW_TOKENS)
    np.testing.assert_array_equal(batch, greedy_tokens(torch, prompts, NEW_TOKENS))
    for row, prompt in zip(batch, prompts, strict=True):  # padding changes nothing for a row
        np.testing.assert_array_equal(row, greedy_tokens(onnx, [prompt], NEW_TOKENS)[0])


def test_check_reports_greedy_agreement_for_decoders(gpt, copy_of):
    from toolkit.compile.parity import check

    record = check(copy_of(gpt))["fp32"]
    assert record["passed"]
    assert record["greedy"]["token_agreement"] == 1.0 and record["greedy"]["identical_rows"] == record["greedy"]["prompts"]


def test_token_agreement_counts_up_to_the_first_divergence():
    want = np.array([[1, 2, 3, 4], [1, 2, 3, 4]])
    got = np.array([[1, 2, 3, 4], [1, 9, 3, 4]])
    assert token_agreement(got, want) == {"prompts": 2, "new_tokens": 4, "token_agreement": 5 / 8, "identical_rows": 1}


def test_generate_text_is_the_decoded_greedy_tokens(generators):
    onnx, _ = generators
    text = onnx.generate(PROMPTS[0], max_new_tokens=32)
    tokens = greedy_tokens(onnx, _ids(onnx, PROMPTS[:1]), 32)[0]
    assert text == onnx.tokenizer.decode(tokens[: list(tokens).index(256)] if 256 in tokens else tokens)


def test_stop_string_cuts_the_text_before_it(generators):
    onnx, _ = generators
    full = onnx.generate(PROMPTS[0], max_new_tokens=48)
    stop = full[20:23]
    assert onnx.generate(PROMPTS[0], max_new_tokens=48, stop=[stop]) == full[: full.index(stop)]


@pytest.mark.parametrize("stop", [(), ("e",), ("the", "xyz-never")])
def test_streamed_pieces_join_to_the_generated_text(generators, stop):
    onnx, _ = generators
    sampling = Sampling(temperature=0.9, top_k=40, seed=3)
    pieces = list(onnx.stream(PROMPTS[1], max_new_tokens=40, stop=stop, sampling=sampling))
    assert "".join(pieces) == onnx.generate(PROMPTS[1], max_new_tokens=40, stop=stop, sampling=sampling)
    assert len(pieces) > 1 or len("".join(pieces)) <= 1


def test_sampling_is_seeded_and_its_limits_reduce_to_greedy(generators):
    onnx, _ = generators
    greedy = onnx.generate(PROMPTS[0], max_new_tokens=24)
    sampled = [onnx.generate(PROMPTS[0], max_new_tokens=24, sampling=Sampling(temperature=1.0, seed=s)) for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    assert onnx.generate(PROMPTS[0], max_new_tokens=24, sampling=Sampling(temperature=1.0, top_k=1, seed=0)) == greedy
    assert onnx.generate(PROMPTS[0], max_new_tokens=24, sampling=Sampling(temperature=1.0, top_p=1e-9, seed=0)) == greedy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature must be a finite number >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
        ({"temperature": 1.0, "top_k": 0}, "top_k must be at least 1, got 0"),
        ({"temperature": 1.0, "top_p": 1.5}, r"top_p must lie in \(0, 1\], got 1.5"),
        ({"top_k": 5}, "set a temperature above 0 to sample"),
    ],
)
def test_nonsense_sampling_values_are_refused(kwargs, message):
    with pytest.raises(ToolkitError, match=message):
        Sampling(**kwargs)


def test_bad_prompts_are_refused_before_any_work(generators):
    onnx, _ = generators
    with pytest.raises(ToolkitError, match="the prompt is empty"):
        onnx.stream("")
    with pytest.raises(ToolkitError, match="prompt 2 of 2 is empty"):
        onnx.generate(["ok", ""])
    with pytest.raises(ToolkitError, match=r"the longest prompt is 200 tokens; with max_new_tokens 8 that is 208, beyond the model's context of 128"):
        onnx.stream("x" * 200, max_new_tokens=8)
    with pytest.raises(ToolkitError, match="max_new_tokens must be at least 1"):
        onnx.generate("ok", max_new_tokens=0)
    with pytest.raises(ToolkitError, match=r"token ids must lie in \[0, 257\), got 3..999"):
        list(onnx.tokens([[3, 999]]))


def test_a_model_without_a_kv_cache_cannot_generate(exported):
    with pytest.raises(ToolkitError, match="mlp is not a decoder with a KV cache"):
        Generator(exported("mlp"))


def test_attention_mask_must_cover_past_and_new_tokens(gpt):
    model = Model(gpt, provider="cpu")
    feeds = make_feeds(model.inputs, {"batch": 1, "seq": 3, "past": 2}, seed=0)
    feeds["attention_mask"] = np.ones((1, 4), dtype=np.int64)
    with pytest.raises(ToolkitError, match=r"input 'attention_mask': its past\+seq axis is 4, but past 2 \+ seq 3 = 5"):
        model.run(feeds)


def test_cli_streams_a_continuation(cli, gpt):
    result = cli("generate", gpt, "--prompt", PROMPTS[0], "-n", "16", "--provider", "cpu")
    assert result.exit_code == 0, result.output
    onnx = Generator(gpt, provider="cpu")
    assert result.stdout == PROMPTS[0] + onnx.generate(PROMPTS[0], max_new_tokens=16) + "\n"
    assert "tokens in" in result.stderr


def test_cli_batch_and_bad_values(cli, gpt):
    result = cli("generate", gpt, "-p", "If", "-p", "Return the", "-n", "8", "--temperature", "0.8", "--top-p", "0.9", "--seed", "1")
    assert result.exit_code == 0 and result.stdout.count("---") == 2 and result.stdout.startswith("If")
    bad = cli("generate", gpt, "-p", "x", "--top-p", "2", "--temperature", "1")
    assert bad.exit_code == 2 and "top_p must lie in (0, 1], got 2.0" in bad.stderr


def test_sample_positions_follow_the_mask_and_out_of_range_positions_are_refused(gpt):
    model = Model(gpt, provider="cpu")
    feeds = make_feeds(model.inputs, {"batch": 3, "seq": 3, "past": 2}, seed=1)
    want = np.maximum(np.cumsum(feeds["attention_mask"], axis=1) - 1, 0)[:, 2:]
    np.testing.assert_array_equal(feeds["position_ids"], want)
    feeds["position_ids"][0, 0] = 128
    with pytest.raises(ToolkitError, match=r"input 'position_ids': positions must lie in \[0, 128\)"):
        model.run(feeds)


@pytest.mark.parametrize("name", ["gpt", "seq2seq"])
def test_check_feeds_a_decoder_step_the_references_own_cache(exported, name):
    from toolkit.bundle import Bundle
    from toolkit.compile.parity import _case_feeds
    from toolkit.reference.run import run_reference
    from toolkit.reference.source import resolve

    manifest = Bundle.open(exported(name)).manifest
    spec = resolve(manifest.source)
    sizes = {"batch": 3, "source": 4} if name == "seq2seq" else {"batch": 3}
    step = _case_feeds(spec, {**sizes, "seq": 5, "past": 7}, seed=2, generation=manifest.generation)
    assert step["past_key_0"].shape == (3, 2, 7, 32) and step["attention_mask"].shape == (3, 12)
    whole = _case_feeds(spec, {**sizes, "seq": 12, "past": 0}, seed=2, generation=manifest.generation)
    # The step over a cached prefix computes what one pass over the whole sequence computes for its tail.
    np.testing.assert_array_equal(step["input_ids"], whole["input_ids"][:, 7:])
    np.testing.assert_allclose(run_reference(spec, step)["logits"], run_reference(spec, whole)["logits"][:, 7:], atol=1e-4)
    if name == "seq2seq":  # its memory is the reference encoder's output over a sample source
        encoder = spec.parts["encoder"]
        sources = make_feeds(encoder.inputs, sizes, seed=2)
        np.testing.assert_array_equal(step["source_mask"], sources["source_mask"])
        np.testing.assert_array_equal(step["memory_value_1"], run_reference(encoder, sources)["memory_value_1"])


SOURCES = ["hello", "abc def", "reverse me please", "x"]


@pytest.fixture(scope="module")
def seq2seq(exported):
    path = exported("seq2seq")
    return path, Generator(path, provider="cpu"), reference_generator(path)


def test_seq2seq_greedy_tokens_match_torch_alone_and_in_a_padded_batch(seq2seq):
    _, onnx, torch = seq2seq
    sources = _ids(onnx, SOURCES)
    batch = greedy_tokens(onnx, sources, NEW_TOKENS)
    np.testing.assert_array_equal(batch, greedy_tokens(torch, sources, NEW_TOKENS))
    for row, source in zip(batch, sources, strict=True):  # padding the source changes nothing for a row
        alone = greedy_tokens(onnx, [source], NEW_TOKENS)[0]
        np.testing.assert_array_equal(row[: len(alone)], alone)
        np.testing.assert_array_equal(alone, greedy_tokens(torch, [source], NEW_TOKENS)[0])


def test_seq2seq_reverses_short_strings_and_its_check_reports_greedy_agreement(seq2seq, copy_of):
    from toolkit.compile.parity import check

    path, onnx, _ = seq2seq
    assert onnx.generate(["abc", "hello"]) == ["cba", "olleh"]
    checked = copy_of(path)
    record = check(checked)["fp32"]
    assert record["passed"] and record["greedy"]["token_agreement"] == 1.0
    assert {"source", "past", "seq"} <= set(record["cases"][0]["sizes"])
    assert record["parts"] == {"encoder": {"passed": True}}
    encoder = Bundle.open(checked / "encoder").manifest
    assert encoder.variants["fp32"].parity["passed"] and encoder.task == "embed"
    assert [t.name for t in encoder.outputs] == [t.name for t in Bundle.open(path).manifest.inputs if t.name.startswith("memory_")]


def test_seq2seq_refuses_a_source_beyond_its_context(seq2seq):
    _, onnx, _ = seq2seq
    with pytest.raises(ToolkitError, match="the longest prompt is 80 tokens, beyond the model's source context of 64"):
        onnx.generate("a" * 80)
    with pytest.raises(ToolkitError, match="max_new_tokens 65 is beyond what the model's decoder holds"):
        onnx.generate("abc", max_new_tokens=65)


def test_cli_prints_the_seq2seq_answer_without_the_prompt(cli, seq2seq):
    path, onnx, _ = seq2seq
    result = cli("generate", path, "-p", "abc", "--provider", "cpu")
    assert result.exit_code == 0, result.output
    assert result.stdout == onnx.generate("abc") + "\n"


def test_generation_benchmark_reports_every_candidate_against_torch(gpt):
    from toolkit.bench.generation import bench_generation

    rows = bench_generation(gpt, variants=["fp32"], batches=(1, 2), prompt_tokens=4, new_tokens=3, rounds=1)
    assert [(r.variant, r.batch) for r in rows] == [("torch-eager", 1), ("fp32", 1), ("torch-eager", 2), ("fp32", 2)]
    for torch_row, row in (rows[0:2], rows[2:4]):
        assert torch_row.parity == "reference" and torch_row.decode_speedup_vs_torch == pytest.approx(1.0)
        assert row.decode_speedup_vs_torch == pytest.approx(torch_row.decode_ms_per_token / row.decode_ms_per_token)
    for row in rows:
        assert (row.provider, row.model, row.prompt_tokens, row.new_tokens) == ("cpu", "gpt", 4, 3)
        assert row.prefill_ms > 0 and row.decode_p90_ms >= row.decode_ms_per_token > 0 and row.tokens_per_s > 0
    with pytest.raises(ToolkitError, match="exceed the model's context"):
        bench_generation(gpt, variants=["fp32"], batches=(1,), prompt_tokens=4, new_tokens=10_000, rounds=1, torch_eager=False)


@pytest.mark.parametrize("name", ["gpt", "seq2seq"])
def test_bound_steps_keep_the_cache_out_of_numpy_and_change_no_token(exported, name):
    """The CUDA path (IO binding; the cache and memory stay where the session computed them, fed
    back as OrtValues), run here on the CPU provider: the same greedy tokens as numpy feeds."""
    import onnxruntime as ort

    from toolkit.runtime.generate.caches import bound_step

    path = exported(name)
    plain, bound = Generator(path, provider="cpu"), Generator(path, provider="cpu")
    kept = {"present_" + n.removeprefix("past_") for n in bound.layout.caches}
    step, returned = bound_step(bound.model, kept), []
    bound._step = lambda feeds: returned.append(step(feeds)) or returned[-1]
    if bound.layout.encoder:
        encoder = Model(path / "encoder", provider="cpu")
        bound._encoder_step = bound_step(encoder, {o.name for o in encoder.outputs})
    prompts = _ids(plain, SOURCES if name == "seq2seq" else PROMPTS)
    np.testing.assert_array_equal(greedy_tokens(bound, prompts, 8), greedy_tokens(plain, prompts, 8))
    assert all(isinstance(out[k], ort.OrtValue) for out in returned for k in kept)
    assert all(isinstance(out["logits"], np.ndarray) for out in returned)


@pytest.fixture(scope="module")
def gpt_static(exported):
    return exported("gpt", static_cache=True)


def test_static_cache_decoding_gives_the_growing_caches_tokens(gpt_static):
    static, growing = Generator(gpt_static, provider="cpu", cache="static"), Generator(gpt_static, provider="cpu")
    assert (static.decode, growing.decode) == ("static", "growing")
    assert growing.note == "in-place cache not used: its attention is not fused (the fused variants opt, int8 and int4 of a rotary decoder have it)"
    prompts = _ids(static, PROMPTS)
    for batch in (prompts, prompts[:1]):
        np.testing.assert_array_equal(greedy_tokens(static, batch, NEW_TOKENS), greedy_tokens(growing, batch, NEW_TOKENS))


def test_the_static_caches_device_buffers_run_on_the_cpu_provider_too(gpt_static):
    """The CUDA-graph path (fixed buffers, two caches taking turns, graphs per batch size) with host
    buffers and nothing captured: everything but the capture itself is exercised here."""
    bound, growing = Generator(gpt_static, provider="cpu", cache="static"), Generator(gpt_static, provider="cpu")
    bound._static.bound = True
    prompts = _ids(bound, PROMPTS)
    for batch in (prompts, prompts[:1], prompts):  # a second batch size, then the first one's buffers again
        np.testing.assert_array_equal(greedy_tokens(bound, batch, NEW_TOKENS), greedy_tokens(growing, batch, NEW_TOKENS))
    assert sorted(bound._static._buffers) == [1, 3]


def test_a_static_cache_needs_the_bundles_static_part(exported):
    with pytest.raises(ToolkitError, match=r"cache 'static' needs a static-cache graph: the bundle has no static-cache part \(re-export gpt with --static-cache\)"):
        Generator(exported("gpt"), provider="cpu", cache="static")
    with pytest.raises(ToolkitError, match="unknown cache 'paged'; choose auto, growing, inplace, static"):
        Generator(exported("gpt"), provider="cpu", cache="paged")



def test_stop_strings_cut_where_the_first_one_completes():
    """Random texts and stop strings (overlapping, repeated): the pieces a stream releases join to the
    text before the first stop string to complete, and what it holds back is only ever the end of
    the text that may still begin a stop string."""
    import random

    from toolkit.runtime.generate.text import TextStream
    from toolkit.runtime.tokenizer import ByteTokenizer

    def first_stop(text, stops):
        for k in range(1, len(text) + 1):
            hits = [i for i in (text[:k].find(s) for s in stops) if i >= 0]
            if hits:
                return text[: min(hits)]
        return text

    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 3))]
        stream = TextStream(ByteTokenizer(), stops)
        pieces = []
        for byte in text.encode():
            pieces.append(stream.push(byte))
            held = stream.text()[len("".join(pieces)):]
            assert stream.finished or not held or any(s.startswith(held) for s in stops), (text, stops, held)
        pieces.append(stream.close())
        assert "".join(pieces) == stream.text() == first_stop(text, stops), (text, stops)
    worst = TextStream(ByteTokenizer(), ["x" * 255 + "y"] * 16)  # the most the server takes, every prefix a candidate
    released = "".join(worst.push(ord("x")) for _ in range(1000))
    assert released == "x" * (1000 - 255)


@pytest.mark.parametrize("decoder", ["gpt", "llama"])
def test_the_text_ends_as_the_tokens_decode_even_inside_a_character(decoder, gpt, exported):
    """A generation cut by its length inside a UTF-8 character: the text is what decoding its tokens
    gives (the cut character as U+FFFD), whole, streamed or not; only the streamed pieces hold bytes
    back until then."""
    from models.hf_causal import causal_lm

    model = Model(gpt if decoder == "gpt" else exported(f"hf:{causal_lm('llama')}", None), provider="cpu")
    generator = Generator(model)
    by_bytes = {generator.tokenizer.token_bytes(t): t for t in range(model.inputs[0].high)}
    forced = [by_bytes[bytes([b])] for b in "é€".encode()[:4]]  # é whole, then two of €'s three bytes

    def steps():
        wanted = iter(forced)

        def step(feeds):
            outputs = dict(model.run_validated(feeds))
            logits = np.full_like(outputs["logits"], -1e4)
            logits[:, -1, next(wanted)] = 0.0
            return outputs | {"logits": logits}

        return step

    generator.use_steps(steps())
    text = generator.generate("Return the", max_new_tokens=len(forced))
    assert text == generator.tokenizer.decode(forced) == "é\ufffd"
    generator.use_steps(steps())
    pieces = list(generator.stream("Return the", max_new_tokens=len(forced)))
    assert "".join(pieces) == text and pieces[0] == "é"
