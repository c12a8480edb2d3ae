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
        # split by the projection's width, not the input's: the two differ once heads are pruned
        return tuple(split_heads(t, self.heads) for t in self.qkv(x).split(self.qkv.out_features // 3, dim=2))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        return self.proj(attention(q, k, v, allowed))

    # The head-pruning hooks toolkit prune calls (README, "Pruning"): which weights make head `head`,
    # and removing heads.
    def head_parameters(self, head: int) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
        return head_parameters(self.heads, [(self.qkv, 3)], [self.proj], head)

    def prune_heads(self, heads: list[int]) -> None:
        self.heads = remove_heads(self.heads, [(self.qkv, 3)], [self.proj], heads)


def _rows(linear: nn.Linear, chunks: int, heads: int, kept: list[int]) -> torch.Tensor:
    """Output rows of `linear` (`chunks` blocks such as q|k|v, each `heads` heads wide) that belong to heads `kept`."""
    width = linear.out_features // chunks
    size = width // heads
    return torch.tensor([c * width + h * size + i for c in range(chunks) for h in kept for i in range(size)])


def head_parameters(heads: int, projections: list[tuple[nn.Linear, int]], outputs: list[nn.Linear],
                    head: int) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
    """(parameter, axis, indices) of head `head`: its rows of each projection (weight and bias) and
    its input columns of each output projection."""
    found = []
    for linear, chunks in projections:
        rows = _rows(linear, chunks, heads, [head])
        found += [(linear.weight, 0, rows)] + ([(linear.bias, 0, rows)] if linear.bias is not None else [])
    return found + [(linear.weight, 1, _columns(linear, heads, [head])) for linear in outputs]


def _columns(linear: nn.Linear, heads: int, kept: list[int]) -> torch.Tensor:
    size = linear.in_features // heads
    return torch.tensor([h * size + i for h in kept for i in range(size)])


def remove_heads(heads: int, projections: list[tuple[nn.Linear, int]], outputs: list[nn.Linear], drop: list[int]) -> int:
    """Removes heads `drop` from the projections and output projections; the new head count."""
    kept = [h for h in range(heads) if h not in set(drop)]
    if not kept:
        raise ValueError("an attention module keeps at least one head")
    for linear, chunks in projections:
        rows = _rows(linear, chunks, heads, kept)
        linear.weight = nn.Parameter(linear.weight.detach()[rows].clone())
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach()[rows].clone())
        linear.out_features = len(rows)
    for linear in outputs:
        columns = _columns(linear, heads, kept)
        linear.weight = nn.Parameter(linear.weight.detach()[:, columns].clone())
        linear.in_features = len(columns)
    return len(kept)


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
