"""User models that the exporters refuse, each for another reason a new user meets (and the
messages must explain): a Python built-in on a tensor's value inside a helper package, a branch on
tensor values, a TorchScript module, a spec that does not fit forward."""

import torch
from torch import nn

from toolkit import Dim, ModelSpec, TensorSpec


class Rounding(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from userhelpers import quantize_scale  # an installed package (the test writes it into a site-packages)

        return quantize_scale(x) + 1


class Branching(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.equal(x[:, :1], x[:, 1:2]):
            return x * 2
        return x - 1


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(x) if scale is None else self.proj(x) * scale


class Pair(nn.Module):
    def forward(self, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return values * weights


def _spec(module: nn.Module, *names: str) -> ModelSpec:
    return ModelSpec(module=module, inputs=[TensorSpec(n, "float32", ("batch", 4)) for n in names or ("x",)], outputs=["y"],
                     dims=[Dim("batch", export=2, check=(1, 3))], task="regress")


def rounding() -> ModelSpec:
    return _spec(Rounding())


def branching() -> ModelSpec:
    return _spec(Branching())


def scripted() -> ModelSpec:
    import warnings

    torch.manual_seed(0)
    with warnings.catch_warnings():  # torch.jit.script is deprecated, and shipped models are still made with it
        warnings.simplefilter("ignore", DeprecationWarning)
        return _spec(torch.jit.script(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))))


def too_many() -> ModelSpec:
    return _spec(Linear(), "x", "scale", "bias")


def too_few() -> ModelSpec:
    return _spec(Pair(), "values")


def reordered() -> ModelSpec:
    return _spec(Pair(), "weights", "values")
