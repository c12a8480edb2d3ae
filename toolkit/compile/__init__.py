"""The compile stages, each a function from bundle to bundle: `export` (PyTorch → a bundle with
variant fp32), `optimize` (→ opt), `quantize` (→ int8, int8-static, fp16), `check` (parity evidence
per variant), and `build` (all of them, then the choice of `best`). Stages take a bundle path or
an open `Bundle`, and the PyTorch reference where the caller has it built already."""

from toolkit.compile.exporter import export
from toolkit.compile.optimizer import optimize
from toolkit.compile.parity import check
from toolkit.compile.pipeline import build, select_best
from toolkit.compile.quantization import quantize

__all__ = ["build", "check", "export", "optimize", "quantize", "select_best"]
