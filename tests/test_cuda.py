"""Parity on the CUDA provider: every reference model's fp32, opt and fp16 variants against the
PyTorch reference, run on the GPU (greedy generation included for the decoders). Skipped, saying
why, where onnxruntime has no working CUDA provider."""

import pytest

from tests.conftest import ZOO
from toolkit.check import check
from toolkit.runtime import Model, cuda_status

CUDA_OK, CUDA_WHY = cuda_status()
pytestmark = pytest.mark.skipif(not CUDA_OK, reason=f"no CUDA provider here: {CUDA_WHY}")


@pytest.mark.parametrize("variant", ["fp32", "opt", "fp16"])
@pytest.mark.parametrize("name", ZOO)
def test_variants_keep_parity_on_cuda(with_variants, name, variant):
    path = with_variants(name, ("opt", "fp16"))
    record = check(path, variants=[variant], provider="cuda")[variant]
    assert record["passed"], record
    assert "cuda" in record["runtime"], record["runtime"]
    assert Model(path, variant=variant, provider="cuda").provider == "cuda"
