"""A GPT-2-like causal decoder LM: pre-LN blocks, tanh-GELU MLP, tied input/output embeddings,
GPT-2 initialisation (N(0, 0.02), residual projections scaled by 1/sqrt(2·layers))."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.attention import SelfAttention
from toolkit.spec import Dim, ModelSpec, TensorSpec


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 8000
    d_model: int = 256
    heads: int = 4
    layers: int = 4
    context: int = 256
    dropout: float = 0.0


PRESETS = {
    "default": GPTConfig(),
    "tiny": GPTConfig(vocab=512, d_model=64, heads=2, layers=2, context=64),
}


class MLP(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.gelu = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg.d_model, cfg.heads)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), allowed)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        causal = torch.tril(torch.ones(cfg.context, cfg.context, dtype=torch.bool))
        self.register_buffer("causal", causal, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.drop(self.wte(input_ids) + self.wpe(positions))  # (B, T, C)
        allowed = self.causal[:T, :T]  # (T, T): query t sees keys <= t
        for block in self.blocks:
            x = block(x, allowed)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)


def build(cfg: GPTConfig) -> ModelSpec:
    torch.manual_seed(0)
    return ModelSpec(
        module=GPT(cfg).eval(),
        inputs=[TensorSpec("input_ids", "int64", ("batch", "seq"), kind="ids", high=cfg.vocab)],
        outputs=["logits"],
        dims=[Dim("batch", export=2, check=(1, 3)), Dim("seq", max=cfg.context, export=8, check=(5, 23))],
        task="generate",
        fusion={"model_type": "gpt2", "num_heads": cfg.heads, "hidden_size": cfg.d_model},
        description=f"GPT {cfg.layers}L d{cfg.d_model} h{cfg.heads} ctx{cfg.context} vocab {cfg.vocab}",
    )
