"""The PyTorch reference at work: a spec's module on numpy feeds, and the generation loop over it."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from toolkit.bundle import Bundle
from toolkit.errors import ToolkitError
from toolkit.runtime.generate import Generator
from toolkit.runtime.model import Model
from toolkit.spec import ModelSpec

__all__ = ["reference_generator", "run_reference"]


def run_reference(spec: ModelSpec, feeds: Mapping[str, np.ndarray], device: str = "cpu") -> dict[str, np.ndarray]:
    """`spec`'s PyTorch module on numpy `feeds` (its inputs, by name), on torch `device` (where the
    module already is) → its outputs by name, as numpy."""
    import torch

    with torch.inference_mode():
        result = spec.module(*(torch.from_numpy(feeds[t.name]).to(device) for t in spec.inputs))
    result = result if isinstance(result, (tuple, list)) else (result,)
    if len(result) != len(spec.outputs):
        raise ToolkitError(f"the reference returned {len(result)} outputs, the spec names {len(spec.outputs)}.")
    return {name: value.cpu().numpy() for name, value in zip(spec.outputs, result, strict=True)}


def reference_generator(bundle: Bundle | str | os.PathLike[str], spec: ModelSpec | None = None, device: str = "cpu",
                        observe: Callable[[dict[str, np.ndarray]], None] | None = None) -> Generator:
    """The Generator's loop over the bundle's PyTorch reference (eager, on torch `device`), for parity
    and benchmarks; `spec` (its `ModelSpec`) saves rebuilding it when the caller has it already (a
    bundle given by path rebuilds only a zoo model's: see `bundle_reference`).
    `observe` sees the outputs of every decoder step, in order (parity reads the logits each token
    was chosen from)."""
    from toolkit.reference.source import bundle_reference

    bundle = Bundle.of(bundle)
    generator = Generator(Model(bundle.path, provider="cpu"))
    spec = spec if spec is not None else bundle_reference(bundle)
    encoder = generator.layout.encoder
    step = _torch_step(spec, device)
    if observe is not None:
        step = _observed(step, observe)
    generator.use_steps(step, _torch_step(spec.parts[encoder], device) if encoder else None)
    return generator


def _observed(step: Callable[[Mapping[str, Any]], dict[str, np.ndarray]],
              observe: Callable[[dict[str, np.ndarray]], None]) -> Callable[[Mapping[str, Any]], dict[str, np.ndarray]]:
    def observed(feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        outputs = step(feeds)
        observe(outputs)
        return outputs

    return observed


def _torch_step(spec: ModelSpec, device: str) -> Callable[[Mapping[str, Any]], dict[str, np.ndarray]]:
    spec.module.to(device)
    return functools.partial(run_reference, spec, device=device)
