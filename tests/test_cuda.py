"""The CUDA provider: every reference model's fp32, opt and fp16 variants against the PyTorch
reference on the GPU (greedy generation included for the decoders), the fp16 made for CUDA, and
CUDA graphs (a fixed-shape model replayed, decoding over the static cache). Skipped, saying why,
where onnxruntime has no working CUDA provider."""

import numpy as np
import pytest

from tests.conftest import ZOO
from toolkit import Generator
from toolkit.compile.parity import check
from toolkit.compile.quantization import FP16_KEEP_FP32_FUSED, quantize
from toolkit.runtime.generate import greedy_tokens
from toolkit.runtime.graphs import CapturedRunner
from toolkit.runtime.model import Model
from toolkit.runtime.samples import make_feeds
from toolkit.runtime.session import cuda_status

CUDA_OK, CUDA_WHY = cuda_status()
pytestmark = pytest.mark.skipif(not CUDA_OK, reason=f"no CUDA provider here: {CUDA_WHY}")
PROMPTS = ["Return the value of", "If the", "Raise ValueError when the argument is not a"]


@pytest.mark.parametrize("name", ["encoder", "gpt"])
def test_fp16_made_for_cuda_keeps_parity_with_fp16_inputs_and_outputs(exported, copy_of, name):
    from toolkit.compile.optimizer import optimize

    path = copy_of(exported(name))
    optimize(path, provider="cuda")
    quantize(path, mode="fp16", source="opt", io="fp16", keep_fp32=FP16_KEEP_FP32_FUSED)
    record = check(path, variants=["fp16"], provider="cuda")["fp16"]
    assert record["passed"], record
    model = Model(path, variant="fp16", provider="cuda")
    assert all(t.dtype == "float16" for t in model.inputs if t.name.startswith("past_"))


def test_a_fixed_shape_model_replays_a_captured_graph_with_the_same_outputs(exported):
    path = exported("mlp")
    plain, captured = Model(path, provider="cuda"), Model(path, provider="cuda", cuda_graph=True)
    runner = CapturedRunner(captured)
    for seed in range(6):  # the first call runs uncaptured, the next ones run, capture, then replay, each with new inputs
        feeds = make_feeds(plain.inputs, {"batch": 4}, seed)
        np.testing.assert_array_equal(runner.run(feeds)["logits"], plain.run(feeds)["logits"])
    assert runner.captured == 1


@pytest.mark.parametrize("variant", ["fp32", "opt"])
def test_cuda_graph_decoding_gives_the_uncaptured_tokens(with_variants, variant):
    path = with_variants("gpt", ("opt", "fp16"), static_cache=True)
    captured = Generator(path, variant=variant, provider="cuda")
    assert captured.decode == "cuda-graph", captured.note
    uncaptured = Generator(path, variant=variant, provider="cuda", cache="static", cuda_graph=False)
    prompts = [captured.tokenizer.encode(p) for p in PROMPTS]
    for batch in (prompts, prompts[:1], prompts):  # a second batch size, then the first one's graphs again
        np.testing.assert_array_equal(greedy_tokens(captured, batch, 64), greedy_tokens(uncaptured, batch, 64))


@pytest.mark.parametrize("variant", ["fp32", "opt", "fp16"])
@pytest.mark.parametrize("name", ZOO)
def test_variants_keep_parity_on_cuda(with_variants, name, variant):
    path = with_variants(name, ("opt", "fp16"))
    record = check(path, variants=[variant], provider="cuda")[variant]
    assert record["passed"], record
    assert "cuda" in record["runtime"], record["runtime"]
    assert Model(path, variant=variant, provider="cuda").provider == "cuda"
