"""A stacked LSTM that scores a variable-length sequence of feature vectors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from toolkit.spec import Dim, ModelSpec, TensorSpec


@dataclass(frozen=True)
class LSTMConfig:
    features: int = 100
    hidden: int = 128
    layers: int = 3


PRESETS = {"default": LSTMConfig(), "tiny": LSTMConfig(features=16, hidden=32, layers=2)}


class LSTMScorer(nn.Module):
    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        self.lstm = nn.LSTM(cfg.features, cfg.hidden, cfg.layers, batch_first=True)
        self.head = nn.Linear(cfg.hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, features) → (B, 1)
        out, _ = self.lstm(x)  # (B, T, hidden)
        return torch.sigmoid(self.head(out[:, -1]))


def build(cfg: LSTMConfig) -> ModelSpec:
    torch.manual_seed(0)
    return ModelSpec(
        module=LSTMScorer(cfg).eval(),
        inputs=[TensorSpec("x", "float32", ("batch", "seq", cfg.features))],
        outputs=["score"],
        dims=[Dim("batch", export=2, check=(1, 4)), Dim("seq", export=7, check=(3, 19))],
        task="regress",
        description=f"LSTM {cfg.layers}×{cfg.hidden} over {cfg.features} features → sigmoid score",
    )
