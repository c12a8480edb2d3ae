"""Models with a deliberate precision fault in one known layer, for localizing and repairing
variants: a plain stack of layers, with a layer inserted whose weights and outputs are past fp16's
range and one after it whose weights are below it (`boosted`), or one channel made an outlier that
per-tensor int8 cannot hold (the same function in exact arithmetic)."""

import numpy as np
import torch
from torch import nn

from toolkit import Dim, ModelSpec, TensorSpec

WIDTH, DEPTH = 32, 6


class Stack(nn.Module):
    """x (batch, 16) → Linear + ReLU, DEPTH times → (batch, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16 if i == 0 else WIDTH, WIDTH) for i in range(DEPTH))
        self.head = nn.Linear(WIDTH, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def _spec(module: nn.Module) -> ModelSpec:
    def sample() -> dict[str, np.ndarray]:
        return {"x": np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)}

    def calibration(n: int) -> dict[str, np.ndarray]:
        return {"x": np.random.default_rng(2).standard_normal((n, 16)).astype(np.float32)}

    return ModelSpec(module=module.eval(), inputs=[TensorSpec("x", "float32", ("batch", 16))], outputs=["y"],
                     dims=[Dim("batch", export=2, check=(1, 3))], task="regress", sample_data=sample, calibration_data=calibration)


def _stack() -> Stack:
    torch.manual_seed(0)
    return Stack()


def plain() -> ModelSpec:
    return _spec(_stack())


def outlier_channel() -> ModelSpec:
    """Channel 5 of layers.2's output scaled up 500× and layers.3's weights reading it down as
    much: the same function, but layers.3's input has one channel that per-tensor int8 resolves and
    the other 31 it rounds to a few levels."""
    model = _stack()
    with torch.no_grad():
        model.layers[2].weight[5] *= 500.0
        model.layers[2].bias[5] *= 500.0
        model.layers[3].weight[:, 5] /= 500.0
    return _spec(model)


def outlier_channels_everywhere() -> ModelSpec:
    """Channel 5 of every layer's output scaled up 500× and left unread by the layer after it: each
    activation has one channel that per-tensor int8 resolves and 31 it rounds to a few levels, in
    more layers than a repair may keep in float, while every weight has a scale of its own to take."""
    model = _stack()
    with torch.no_grad():
        for layer, reader in zip(model.layers, [*model.layers[1:], model.head], strict=True):
            layer.weight[5] *= 500.0
            layer.bias[5] *= 500.0
            reader.weight[:, 5] = 0.0
    return _spec(model)


class Boosted(nn.Module):
    """The stack with `boost` after layers.2, a layer with weights past fp16's range (a scale folded
    into them) whose outputs reach about 1e6, and `calm` after it, whose weights are below fp16's
    smallest value and read them back down: both must stay in fp32."""

    def __init__(self, stack: Stack) -> None:
        super().__init__()
        self.layers, self.head = stack.layers, stack.head
        self.boost, self.calm = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        with torch.no_grad():
            self.boost.weight *= 3e6
            self.boost.bias.zero_()
            self.calm.weight *= 1e-5
            self.calm.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = torch.relu(layer(x))
            if i == 2:
                x = self.calm(self.boost(x))
        return self.head(x)


def boosted() -> ModelSpec:
    """fp16 fails at `boost` and `calm`: kept in fp32, the two must exchange fp32 directly."""
    return _spec(Boosted(_stack()))
