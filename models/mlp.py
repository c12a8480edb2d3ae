"""The classic dense classifier: 784 → 128 → 128 → 10 with ReLU and dropout, trained on digits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models import digits
from toolkit.spec import ModelSpec


@dataclass(frozen=True)
class MLPConfig:
    in_features: int = digits.SIDE * digits.SIDE
    hidden: int = 128
    layers: int = 2
    classes: int = 10
    dropout: float = 0.2
    epochs: int = 30


PRESETS = {"default": MLPConfig(), "tiny": MLPConfig(hidden=32, epochs=20)}


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig):
        super().__init__()
        blocks, width = [], cfg.in_features
        for _ in range(cfg.layers):
            blocks += [nn.Linear(width, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = cfg.hidden
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(width, cfg.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 784) → (B, classes)
        return self.head(self.body(x))


def build(cfg: MLPConfig) -> ModelSpec:
    torch.manual_seed(0)
    return digits.classifier_spec(
        MLP(cfg), cfg, input_name="x", input_shape=(cfg.in_features,),
        description=f"MLP {cfg.in_features}-{cfg.hidden}x{cfg.layers}-{cfg.classes} on 28×28 digits",
    )
