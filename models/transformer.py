"""A BERT-like Transformer encoder classifier: token + learned position embeddings, post-LN blocks
of padding-masked self-attention and GELU feed-forward, first-token pooler, class logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.attention import SelfAttention
from toolkit.spec import Dim, ModelSpec, TensorSpec


@dataclass(frozen=True)
class EncoderConfig:
    vocab: int = 8000
    d_model: int = 256
    heads: int = 4
    layers: int = 4
    ffn: int = 1024
    max_seq: int = 128
    classes: int = 2
    dropout: float = 0.1


PRESETS = {
    "default": EncoderConfig(),
    "tiny": EncoderConfig(vocab=512, d_model=64, heads=2, layers=2, ffn=128, max_seq=64),
    # BERT-base's shape (110M parameters), seeded initialisation: for benchmarks at real size.
    "bert-base": EncoderConfig(vocab=30522, d_model=768, heads=12, layers=12, ffn=3072, max_seq=512),
}


class EncoderBlock(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attn = SelfAttention(cfg.d_model, cfg.heads)
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.ffn = nn.Sequential(nn.Linear(cfg.d_model, cfg.ffn), nn.GELU(), nn.Linear(cfg.ffn, cfg.d_model))
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.drop(self.attn(x, allowed)))
        return self.ln2(x + self.drop(self.ffn(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq, cfg.d_model)
        self.ln = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.layers))
        self.pooler = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_model), nn.Tanh())
        self.classifier = nn.Linear(cfg.d_model, cfg.classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.drop(self.ln(self.tok(input_ids) + self.pos(positions)))  # (B, T, C)
        allowed = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys that are not padding
        for block in self.blocks:
            x = block(x, allowed)
        return self.classifier(self.pooler(x[:, 0]))  # (B, classes)


def build(cfg: EncoderConfig) -> ModelSpec:
    torch.manual_seed(0)
    return ModelSpec(
        module=Encoder(cfg).eval(),
        inputs=[
            TensorSpec("input_ids", "int64", ("batch", "seq"), kind="ids", high=cfg.vocab),
            TensorSpec("attention_mask", "int64", ("batch", "seq"), kind="mask"),
        ],
        outputs=["logits"],
        dims=[Dim("batch", export=2, check=(1, 3)), Dim("seq", max=cfg.max_seq, export=8, check=(5, 17))],
        task="classify",
        fusion={"model_type": "bert", "num_heads": cfg.heads, "hidden_size": cfg.d_model},
        description=f"encoder {cfg.layers}L d{cfg.d_model} h{cfg.heads} ffn{cfg.ffn} vocab {cfg.vocab}",
    )
