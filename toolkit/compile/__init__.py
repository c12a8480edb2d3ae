"""The compile stages, each a function from bundle to bundle: `export` (PyTorch → a bundle with
variant fp32), `optimize` (→ opt), `quantize` (→ int8, int8-static, fp16, int4), `check` (parity
evidence per variant), `localize` (where a variant departs from fp32), `repair` (a failing variant
made again until it passes), `prune` (a PyTorch model → a smaller one → its own bundle), and `build`
(all of them, then the choice of `best`). Stages take a bundle path or an open `Bundle`, and the
PyTorch reference where the caller has it built already."""

from toolkit.compile.exporter import export
from toolkit.compile.localize import localize
from toolkit.compile.optimizer import optimize
from toolkit.compile.parity import check
from toolkit.compile.pipeline import build, select_best
from toolkit.compile.prune import prune
from toolkit.compile.quantization import quantize
from toolkit.compile.repair import repair

__all__ = ["build", "check", "export", "localize", "optimize", "prune", "quantize", "repair", "select_best"]
