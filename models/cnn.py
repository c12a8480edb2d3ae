"""A small convolutional classifier for 1×28×28 images, trained on digits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models import digits
from toolkit.spec import ModelSpec


@dataclass(frozen=True)
class CNNConfig:
    channels: tuple[int, int, int] = (32, 64, 64)
    hidden: int = 64
    classes: int = 10
    epochs: int = 20


PRESETS = {"default": CNNConfig(), "tiny": CNNConfig(channels=(8, 16, 16), hidden=32)}


class CNN(nn.Module):
    def __init__(self, cfg: CNNConfig):
        super().__init__()
        c1, c2, c3 = cfg.channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3), nn.ReLU(), nn.MaxPool2d(2),  # 28 → 26 → 13
            nn.Conv2d(c1, c2, 3), nn.ReLU(), nn.MaxPool2d(2),  # 13 → 11 → 5
            nn.Conv2d(c2, c3, 3), nn.ReLU(),  # 5 → 3
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c3 * 3 * 3, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.classes)
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) → (B, classes)
        return self.classifier(self.features(image))


def build(cfg: CNNConfig) -> ModelSpec:
    torch.manual_seed(0)
    return digits.classifier_spec(
        CNN(cfg), cfg, input_name="image", input_shape=(1, digits.SIDE, digits.SIDE),
        description=f"CNN {cfg.channels} → {cfg.hidden} → {cfg.classes} on 28×28 digits",
    )
