"""toolkit: export PyTorch models to ONNX, optimize and quantize them, run them with onnxruntime,
and serve them — every compiled variant with parity evidence against its PyTorch reference.

Importing `toolkit` and using the runtime never imports torch.
"""

from __future__ import annotations

from typing import Any

from toolkit._version import __version__
from toolkit.attribution import GRADIENT_METHODS, Explanation
from toolkit.attribution import explain as _perturbing
from toolkit.errors import CheckFailed, ToolkitError
from toolkit.runtime.generate import Generator, Sampling
from toolkit.runtime.model import Model, load
from toolkit.spec import Dim, ModelSpec, TensorSpec

__all__ = ["load", "Model", "Generator", "Sampling", "explain", "Explanation", "ModelSpec", "TensorSpec", "Dim", "ToolkitError", "CheckFailed",
           "__version__"]


def explain(model: Model, feeds: Any, *, method: str = "occlusion", **options: Any) -> Explanation:
    """Why `model` answered what it did on `feeds`: attributions of its target score to each input,
    shaped like it. The perturbation methods ("occlusion", "shapley") run on the ONNX session
    (toolkit.attribution.explain: no torch); the gradient methods ("integrated-gradients",
    "input-x-gradient") on the bundle's PyTorch source, with Captum
    (toolkit.reference.gradients.explain_gradients)."""
    if method in GRADIENT_METHODS:
        from toolkit.reference.gradients import explain_gradients

        return explain_gradients(model, feeds, method=method, **options)
    return _perturbing(model, feeds, method=method, **options)
