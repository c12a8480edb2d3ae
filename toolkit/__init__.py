"""toolkit: export PyTorch models to ONNX, optimize and quantize them, run them with onnxruntime,
and serve them — every compiled variant with parity evidence against its PyTorch reference.

Importing `toolkit` and using the runtime never imports torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

from toolkit.attribution import Explanation, explain
from toolkit.errors import CheckFailed, ToolkitError
from toolkit.runtime.generate import Generator, Sampling
from toolkit.runtime.model import Model, load
from toolkit.spec import Dim, ModelSpec, TensorSpec

__all__ = ["load", "Model", "Generator", "Sampling", "explain", "Explanation", "ModelSpec", "TensorSpec", "Dim", "ToolkitError", "CheckFailed",
           "__version__"]
