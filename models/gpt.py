"""A GPT-2-like causal decoder LM over bytes: pre-LN blocks, tanh-GELU MLP, tied input/output
embeddings, GPT-2 initialisation (N(0, 0.02), residual projections scaled by 1/sqrt(2·layers)),
trained briefly on the standard library's docstrings (models/text.py).

The exported graph is the decoder with a KV cache: one graph serves the prompt (empty past) and
every decode step, with the attention mask covering past and new positions (left-padded batches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from models.attention import SelfAttention
from toolkit.spec import Dim, ModelSpec, TensorSpec
from toolkit.tokenizer import ByteTokenizer


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = ByteTokenizer.vocab_size
    d_model: int = 128
    heads: int = 4
    layers: int = 4
    context: int = 256
    dropout: float = 0.0
    train_steps: int = 600  # models/text.py trains each preset this long (about 3 minutes on 2 cores; cached)


PRESETS = {
    "default": GPTConfig(),
    "tiny": GPTConfig(d_model=64, heads=2, layers=2, context=128, train_steps=60),
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

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, past_k: torch.Tensor | None = None,
                past_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C), past (B, h, P, hs) → x, and keys/values (B, h, P+T, hs) for the cache."""
        q, k, v = self.attn.project(self.ln1(x))
        if past_k is not None:  # axis -2, not 2: onnxscript's fusion of attention with its cache matches it literally
            k, v = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
        x = x + self.attn.attend(q, k, v, allowed)
        return x + self.mlp(self.ln2(x)), k, v


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
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
        """Training and scoring: (B, T) → logits (B, T, vocab), no padding, no cache."""
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        logits, _ = self.decode(input_ids, torch.ones_like(input_ids), positions, [])
        return logits

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
               past: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """input_ids, position_ids (B, T); attention_mask (B, P+T), 1 for real tokens; past: per layer
        (keys, values), each (B, h, P, hs), or [] → logits (B, T, vocab) and the grown cache."""
        T, S = input_ids.shape[1], attention_mask.shape[1]
        keys = torch.arange(S, device=input_ids.device)
        queries = torch.arange(T, device=input_ids.device) + (S - T)  # absolute index of each new token
        causal = keys[None, :] <= queries[:, None]  # (T, S)
        allowed = causal[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))  # (B, T, C)
        present = []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, allowed, *(past[i] if past else (None, None)))
            present.append((k, v))
        return self.lm_head(self.ln_f(x)), present


class CachedDecoder(nn.Module):
    """GPT.decode with flat tensors in and out, the form the ONNX graph takes:
    (input_ids, attention_mask, position_ids, past_key_0, past_value_0, ...) →
    (logits, present_key_0, present_value_0, ...)."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids, attention_mask, position_ids, *past_flat):
        past = list(zip(past_flat[0::2], past_flat[1::2], strict=True))
        logits, present = self.gpt.decode(input_ids, attention_mask, position_ids, past)
        return (logits, *(t for kv in present for t in kv))


def cache_names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


def decoder_inputs(vocab: int, context: int) -> list[TensorSpec]:
    """A decoder step's token inputs: new ids, the mask over cached and new tokens, their positions."""
    return [
        TensorSpec("input_ids", "int64", ("batch", "seq"), kind="ids", high=vocab),
        TensorSpec("attention_mask", "int64", ("batch", "past+seq"), kind="mask"),
        TensorSpec("position_ids", "int64", ("batch", "seq"), kind="positions", high=context),
    ]


def _real_text(cfg: GPTConfig, rows: int = 64, length: int = 32) -> dict[str, np.ndarray]:
    """Prompt-step inputs (empty cache) over held-out text: the inputs task gates are judged on."""
    from models.text import validation_windows

    ids = validation_windows(rows, length)
    empty = np.zeros((rows, cfg.heads, 0, cfg.d_model // cfg.heads), dtype=np.float32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.broadcast_to(np.arange(length), ids.shape).copy(),
            **{name: empty for name in cache_names(cfg.layers, "past")}}


def build(cfg: GPTConfig) -> ModelSpec:
    from models.text import train_gpt

    torch.manual_seed(0)
    gpt, metrics = train_gpt(GPT(cfg), cfg)
    head = cfg.d_model // cfg.heads
    cache = ("batch", cfg.heads, "past", head)
    return ModelSpec(
        module=CachedDecoder(gpt).eval(),
        inputs=[
            *decoder_inputs(cfg.vocab, cfg.context),
            *(TensorSpec(name, "float32", cache) for name in cache_names(cfg.layers, "past")),
        ],
        outputs=["logits", *cache_names(cfg.layers, "present")],
        dims=[
            Dim("batch", export=2, check=(1, 3)),
            Dim("seq", max=cfg.context, export=8, check=(5, 23)),
            Dim("past", min=0, max=cfg.context, export=4, check=(0, 7)),
        ],
        task="generate",
        sample_data=partial(_real_text, cfg),
        fusion={"model_type": "gpt2", "num_heads": cfg.heads, "hidden_size": cfg.d_model},
        generation={"tokenizer": ByteTokenizer.kind, "eos_token_id": ByteTokenizer.eos_id, "context": cfg.context},
        description=f"GPT {cfg.layers}L d{cfg.d_model} h{cfg.heads} ctx{cfg.context}, bytes, KV cache; "
                    f"trained on stdlib docstrings, val loss {metrics['val_loss']:.2f} nats/byte",
    )
