"""A GPT-2-like causal decoder LM over bytes: pre-LN blocks, tanh-GELU MLP, tied input/output
embeddings, GPT-2 initialisation (N(0, 0.02), residual projections scaled by 1/sqrt(2·layers)),
trained briefly on the standard library's docstrings (models/text.py).

The exported graph is the decoder with a KV cache: one graph serves the prompt (empty past) and
every decode step, with the attention mask covering past and new positions (left-padded batches).
Its part `static` is the same decoder over a cache preallocated to the context length: every step
has the same shapes, so on CUDA one captured graph replays each decode step (toolkit.runtime.generate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from models.attention import SelfAttention
from toolkit.runtime.tokenizer import ByteTokenizer
from toolkit.spec import Dim, ModelSpec, TensorSpec


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = ByteTokenizer.vocab_size
    d_model: int = 128
    heads: int = 4
    layers: int = 4
    context: int = 256
    dropout: float = 0.0
    train_steps: int = 600  # models/text.py trains each preset this long (about 3 minutes on 2 cores; cached); 0: untrained


PRESETS = {
    "default": GPTConfig(),
    "tiny": GPTConfig(d_model=64, heads=2, layers=2, context=128, train_steps=60),
    # GPT-2 small's shape (124M parameters), seeded GPT-2 initialisation, untrained: for benchmarks at real size.
    "gpt2-small": GPTConfig(vocab=50257, d_model=768, heads=12, layers=12, context=1024, train_steps=0),
}


class MLP(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.gelu = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.gelu(self.fc(x)))


class StaticSlots:
    """Where a step's new keys and values go in a preallocated cache (B, h, S, hs): at slots
    `cache_position` (T,). Written with a one-hot product and a select over the whole cache, so that
    every value the graph computes comes from its inputs on the device (no shape arithmetic feeds a
    computation, which would cost a host-to-device copy and rule out CUDA graphs); exact, since each
    slot receives one term times 1 and zeros."""

    def __init__(self, cache_position: torch.Tensor, size: int, dtype: torch.dtype):
        slots = torch.arange(size, device=cache_position.device)
        self.onehot = (slots[:, None] == cache_position[None, :]).to(dtype)  # (S, T)
        self.written = self.onehot.sum(-1)[:, None] > 0  # (S, 1)

    def write(self, cache: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """cache (B, h, S, hs), new (B, h, T, hs) → the cache with new written at its slots."""
        return torch.where(self.written, self.onehot @ new, cache)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg.d_model, cfg.heads)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, past_k: torch.Tensor | None = None,
                past_v: torch.Tensor | None = None, slots: StaticSlots | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C), past (B, h, P, hs) → x, and keys/values (B, h, P+T, hs) for the cache; with
        `slots`, past is a preallocated cache (B, h, S, hs) and the new keys/values are written into it."""
        q, k, v = self.attn.project(self.ln1(x))
        if slots is not None:
            k, v = slots.write(past_k, k), slots.write(past_v, v)
        elif past_k is not None:  # axis -2, not 2: onnxscript's fusion of attention with its cache matches it literally
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
               past: list[tuple[torch.Tensor, torch.Tensor]], cache_position: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """input_ids, position_ids (B, T); attention_mask (B, S), 1 for real tokens; past: per layer
        (keys, values), each (B, h, P, hs), or [] → logits (B, T, vocab) and the cache.

        Without `cache_position` the cache grows: S = P + T and the new tokens follow the past ones.
        With it (T,), past is preallocated (P = S) and the new tokens go to those slots."""
        T, S = input_ids.shape[1], attention_mask.shape[1]
        keys = torch.arange(S, device=input_ids.device)
        slots = None
        if cache_position is None:
            cache_position = torch.arange(T, device=input_ids.device) + (S - T)  # absolute index of each new token
        else:
            slots = StaticSlots(cache_position, S, self.wte.weight.dtype)
        causal = keys[None, :] <= cache_position[:, None]  # (T, S)
        allowed = causal[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))  # (B, T, C)
        present = []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, allowed, *(past[i] if past else (None, None)), slots=slots)
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


class StaticCacheDecoder(nn.Module):
    """GPT.decode over a preallocated cache, flat: (input_ids, attention_mask (B, S), position_ids,
    cache_position (T,), past_key_0 (B, h, S, hs), ...) → (logits, present_key_0, ...), each present
    the past with this step's keys/values written at `cache_position`."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids, attention_mask, position_ids, cache_position, *past_flat):
        past = list(zip(past_flat[0::2], past_flat[1::2], strict=True))
        logits, present = self.gpt.decode(input_ids, attention_mask, position_ids, past, cache_position)
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


def _real_text(cfg: GPTConfig, rows: int = 64, length: int = 32, static: bool = False) -> dict[str, np.ndarray]:
    """Prompt-step inputs over held-out text (an empty cache, or a preallocated one): the inputs task
    gates are judged on."""
    from models.text import validation_windows

    ids = validation_windows(rows, length)
    positions = np.broadcast_to(np.arange(length), ids.shape).copy()
    if not static:
        empty = np.zeros((rows, cfg.heads, 0, cfg.d_model // cfg.heads), dtype=np.float32)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": positions,
                **{name: empty for name in cache_names(cfg.layers, "past")}}
    mask = np.zeros((rows, cfg.context), dtype=np.int64)
    mask[:, :length] = 1
    cache = np.zeros((rows, cfg.heads, cfg.context, cfg.d_model // cfg.heads), dtype=np.float32)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "cache_position": np.arange(length),
            **{name: cache for name in cache_names(cfg.layers, "past")}}


def _static_case(decoder: StaticCacheDecoder, cfg: GPTConfig, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """A parity case of the static-cache graph: the cache holds the model's own keys and values over
    the first `past` tokens of a sample sequence (random caches are states no generation reaches),
    and the step writes the next `seq` tokens after them."""
    from toolkit.runtime.samples import make_feeds

    batch, new, past = sizes["batch"], sizes["seq"], sizes["past"]
    whole = make_feeds(decoder_inputs(cfg.vocab, cfg.context), {"batch": batch, "seq": past + new, "past": 0}, seed)
    mask = np.zeros((batch, cfg.context), dtype=np.int64)
    mask[:, : past + new] = whole["attention_mask"]
    names = cache_names(cfg.layers, "past")
    cache = {n: np.zeros((batch, cfg.heads, cfg.context, cfg.d_model // cfg.heads), dtype=np.float32) for n in names}
    if past:
        first = np.where(np.arange(cfg.context) < past, mask, 0)
        with torch.inference_mode():
            out = decoder(*(torch.from_numpy(a) for a in (whole["input_ids"][:, :past], first, whole["position_ids"][:, :past], np.arange(past))),
                          *(torch.from_numpy(cache[n]) for n in names))
        cache = {n: t.numpy() for n, t in zip(names, out[1:], strict=True)}
    return {"input_ids": whole["input_ids"][:, past:], "attention_mask": mask, "position_ids": whole["position_ids"][:, past:],
            "cache_position": np.arange(past, past + new), **cache}


def _dims(cfg: GPTConfig) -> list[Dim]:
    return [Dim("batch", export=2, check=(1, 3)), Dim("seq", max=cfg.context, export=8, check=(5, 23)),
            Dim("past", min=0, max=cfg.context, export=4, check=(0, 7))]


def _static_part(gpt: GPT, cfg: GPTConfig) -> ModelSpec:
    decoder = StaticCacheDecoder(gpt).eval()
    cache = ("batch", cfg.heads, cfg.context, cfg.d_model // cfg.heads)
    ids, _, positions = decoder_inputs(cfg.vocab, cfg.context)
    return ModelSpec(
        module=decoder,
        inputs=[ids, TensorSpec("attention_mask", "int64", ("batch", cfg.context), kind="mask"), positions,
                TensorSpec("cache_position", "int64", ("seq",), kind="positions", high=cfg.context),
                *(TensorSpec(name, "float32", cache) for name in cache_names(cfg.layers, "past"))],
        outputs=["logits", *cache_names(cfg.layers, "present")],
        dims=_dims(cfg),
        task="generate",
        sample_data=partial(_real_text, cfg, 4, static=True),
        case_feeds=partial(_static_case, decoder, cfg),
        description=f"the decoder over a cache preallocated to {cfg.context} positions",
    )


def build(cfg: GPTConfig) -> ModelSpec:
    from models.text import fine_tune_gpt, train_gpt

    torch.manual_seed(0)
    if cfg.train_steps:
        gpt, metrics = train_gpt(GPT(cfg), cfg)
        trained = f"trained on stdlib docstrings, val loss {metrics['val_loss']:.2f} nats/byte"
    else:
        gpt, trained = GPT(cfg).eval(), "untrained (seeded GPT-2 initialisation)"
    head = cfg.d_model // cfg.heads
    cache = ("batch", cfg.heads, "past", head)
    return ModelSpec(
        module=CachedDecoder(gpt).eval(),
        inputs=[
            *decoder_inputs(cfg.vocab, cfg.context),
            *(TensorSpec(name, "float32", cache) for name in cache_names(cfg.layers, "past")),
        ],
        outputs=["logits", *cache_names(cfg.layers, "present")],
        dims=_dims(cfg),
        task="generate",
        sample_data=partial(_real_text, cfg),
        fusion={"model_type": "gpt2", "num_heads": cfg.heads, "hidden_size": cfg.d_model},
        generation={"tokenizer": ByteTokenizer.kind, "eos_token_id": ByteTokenizer.eos_id, "context": cfg.context, "static": "static"},
        parts={"static": _static_part(gpt, cfg)},
        fine_tune=partial(fine_tune_gpt, gpt, cfg, metrics) if cfg.train_steps else None,
        description=f"GPT {cfg.layers}L d{cfg.d_model} h{cfg.heads} ctx{cfg.context}, bytes, KV cache; {trained}",
    )
