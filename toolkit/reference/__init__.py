"""The PyTorch side: what a MODEL reference (zoo name, package.module:factory, hf:PATH) resolves
to, and the reference module at work (one step, or the generation loop). Both the compile stages
(export, check, calibration) and bench (torch baselines) stand on it."""

from toolkit.reference.run import reference_generator, run_reference
from toolkit.reference.source import reference_models, resolve, source_of, weights_sha256

__all__ = ["reference_generator", "reference_models", "resolve", "run_reference", "source_of", "weights_sha256"]
