"""Multi-head attention shared by the reference Transformers."""

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
        return tuple(split_heads(t, self.heads) for t in self.qkv(x).split(x.shape[-1], dim=2))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        return self.proj(attention(q, k, v, allowed))


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, C) → (B, heads, T, C // heads)."""
    B, T, C = x.shape
    return x.view(B, T, heads, C // heads).transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """q (B, h, T, hs) over keys/values (B, h, S, hs); allowed broadcastable to (B, h, T, S) → (B, T, h·hs)."""
    B, h, T, hs = q.shape
    # Written out rather than F.scaled_dot_product_attention: torch.onnx's decomposition of that op
    # reshapes with allowzero=0 and fails on zero-length sequences, while this form exports cleanly
    # and is what onnxscript's attention fusion recognises (an additive mask).
    bias = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~allowed, torch.finfo(q.dtype).min)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs)) + bias  # (B, h, T, S)
    y = scores.softmax(dim=-1) @ v  # (B, h, T, hs)
    return y.transpose(1, 2).contiguous().view(B, T, h * hs)
