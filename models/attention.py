"""Multi-head self-attention shared by the encoder and the decoder."""

from __future__ import annotations

import math

import torch
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        assert d_model % heads == 0, "d_model must be divisible by heads"
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x (B, T, C); allowed: bool, broadcastable to (B, heads, T, T), True where a query may attend."""
        q, k, v = self.project(x)
        return self.attend(q, k, v, allowed)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) → q, k, v, each (B, heads, T, head_size)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        return tuple(t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """q (B, h, T, hs) over keys/values (B, h, S, hs); allowed broadcastable to (B, h, T, S)."""
        B, h, T, hs = q.shape
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, h, T, S)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        y = scores.softmax(dim=-1) @ v  # (B, h, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, h * hs)
        return self.proj(y)
