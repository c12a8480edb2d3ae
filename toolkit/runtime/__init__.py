"""What apps embed: `load` a bundle's variant into a `Model` on the CPU or CUDA provider, and
`Generator` for decoders. Never imports torch or the compile side."""

from toolkit.runtime.generate import Generator, Sampling
from toolkit.runtime.model import Model, load
from toolkit.runtime.session import PROVIDERS, cuda_status, new_session

__all__ = ["PROVIDERS", "Generator", "Model", "Sampling", "cuda_status", "load", "new_session"]
