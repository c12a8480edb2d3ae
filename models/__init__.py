"""Reference PyTorch models: a flat registry of families, each a frozen config with presets.

`toolkit` reaches this package only through `build()` (and `families()` for listing), so a user's
`package.module:factory` is handled the same way as a zoo model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

__all__ = ["Family", "FAMILIES", "build", "families"]


@dataclass(frozen=True)
class Family:
    name: str
    module: str  # models.<module> defines PRESETS and build(config)
    task: str
    summary: str

    def presets(self) -> dict[str, Any]:
        return importlib.import_module(f"models.{self.module}").PRESETS


FAMILIES = {
    f.name: f
    for f in (
        Family("mlp", "mlp", "classify", "dense classifier 784→128→128→10, trained on digits"),
        Family("cnn", "cnn", "classify", "3-conv classifier on 1×28×28, trained on digits"),
        Family("lstm", "lstm", "regress", "stacked LSTM over (batch, seq, features) → sigmoid score"),
        Family("encoder", "transformer", "classify", "BERT-like Transformer encoder classifier with padding mask"),
        Family("gpt", "gpt", "generate", "GPT-2-like causal decoder LM with tied embeddings"),
        Family("seq2seq", "seq2seq", "generate", "Transformer encoder-decoder (sinusoidal positions), reverses strings"),
    )
}


def families() -> list[Family]:
    return list(FAMILIES.values())


def build(name: str, preset: str = "default"):
    """The `toolkit.spec.ModelSpec` of a zoo model; raises KeyError naming what is known."""
    if name not in FAMILIES:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(FAMILIES)}")
    family = FAMILIES[name]
    presets = family.presets()
    if preset not in presets:
        raise KeyError(f"model {name!r} has no preset {preset!r}; presets: {', '.join(presets)}")
    module = importlib.import_module(f"models.{family.module}")
    return module.build(presets[preset])
