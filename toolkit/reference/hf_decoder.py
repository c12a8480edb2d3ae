"""Hugging Face causal LMs (`*ForCausalLM`, `*LMHeadModel`) as decoders with a KV cache, in the zoo
gpt's layout, so that the Generator, `toolkit generate`, the serve routes and check's greedy parity
drive them unchanged (toolkit.runtime.generate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.reference.samples import sentences
from toolkit.runtime.tokenizer import HF_TOKENIZER_FILE
from toolkit.spec import Dim, ModelSpec, TensorSpec

__all__ = ["cache_argument", "cache_names", "cache_tensors", "causal_lm_spec", "dynamic_cache", "eos_ids", "generation_config",
           "chat_template", "generation_rules", "group_attention", "returned_cache", "text_config", "tokenizer_json"]

_SAMPLE_ROWS = 256


def causal_lm_spec(path: Path, model: Any, tokenizer: Any, config: Any, architecture: str, context: int) -> ModelSpec:
    """A causal LM as a decoder with a KV cache, in the zoo gpt's layout (toolkit.runtime.generate):
    input_ids, attention_mask over cached and new tokens, position_ids and past_key_i/past_value_i
    (batch, key-value heads, past, head size) → logits and present_key_i/present_value_i. The cache
    goes through transformers' own cache class, so every architecture that takes one works alike."""
    text = text_config(config)
    layers = text.num_hidden_layers
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_size = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    names = cache_names("past", layers)
    cache = ("batch", kv_heads, "past", head_size)
    eos = eos_ids(path, config, tokenizer)

    def sample_data(rows: int = 64, length: int = 32) -> dict[str, np.ndarray]:
        """Prompt-step inputs (empty cache) over real sentences: the inputs task gates are judged on."""
        ids = _token_windows(tokenizer, sentences(_SAMPLE_ROWS), rows, length)
        empty = np.zeros((rows, kv_heads, 0, head_size), dtype=np.float32)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.broadcast_to(np.arange(length), ids.shape).copy(),
                **{name: empty for name in names}}

    return ModelSpec(
        module=_CachedLM(model, layers).eval(),
        inputs=[
            TensorSpec("input_ids", "int64", ("batch", "seq"), kind="ids", high=text.vocab_size),
            TensorSpec("attention_mask", "int64", ("batch", "past+seq"), kind="mask"),
            TensorSpec("position_ids", "int64", ("batch", "seq"), kind="positions", high=context),
            *(TensorSpec(name, "float32", cache) for name in names),
        ],
        outputs=["logits", *(n.replace("past_", "present_") for n in names)],
        dims=[Dim("batch", export=2, check=(1, 3)), Dim("seq", max=context, export=8, check=(5, 23)),
              Dim("past", min=0, max=context, export=4, check=(0, 7))],
        task="generate",
        description=f"{architecture} from {path} (decoder with a KV cache)",
        sample_data=sample_data,
        generation={"tokenizer": "hf", "eos_token_id": eos[0], "eos_token_ids": eos, "context": context, **generation_rules(path, config),
                    **chat_template(tokenizer)},
        assets=tokenizer_json(path, tokenizer),
    )


_GROUPED_EAGER = "toolkit_grouped_eager"


def group_attention(model: Any) -> None:
    """Grouped-query attention without copying the cache: transformers' eager attention repeats each
    key-value head for every query head it serves (`repeat_kv`), which in the exported graph is an
    Expand of the whole cache, every layer and every step. Where the model's eager attention is
    exactly the LLaMA family's (compared by source), it is swapped for the same arithmetic over the
    query heads grouped per key-value head (`_grouped_eager_attention`)."""
    import inspect
    import sys

    import transformers
    from transformers.models.llama import modeling_llama

    config = text_config(model.config)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    eager = getattr(sys.modules.get(type(model).__module__), "eager_attention_forward", None)
    if kv_heads == heads or eager is None or inspect.getsource(eager) != inspect.getsource(modeling_llama.eager_attention_forward):
        return
    from transformers import masking_utils

    transformers.AttentionInterface.register(_GROUPED_EAGER, _grouped_eager_attention)
    # and eager's additive float mask (a name transformers does not know gets sdpa's boolean one)
    masking_utils.AttentionMaskInterface.register(_GROUPED_EAGER, masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    model.set_attn_implementation(_GROUPED_EAGER)


def _grouped_eager_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float,
                             dropout: float = 0.0, **_: Any) -> tuple[Any, Any]:
    """transformers' eager attention (LLaMA's `eager_attention_forward`) with the query heads that
    share a key-value head stacked along the sequence axis instead of the key-value heads repeated:
    query head h reads key-value head h // groups in both, so the products are the same."""
    import torch

    batch, heads, length, size = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    stacked = query.reshape(batch, kv_heads, heads // kv_heads * length, size)
    weights = (torch.matmul(stacked, key.transpose(2, 3)) * scaling).reshape(batch, heads, length, total)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights.reshape(batch, kv_heads, heads // kv_heads * length, total), value)
    return output.reshape(batch, heads, length, size).transpose(1, 2).contiguous(), weights


def text_config(config: Any) -> Any:
    """The language model's own config (multimodal configs nest it)."""
    return getattr(config, "text_config", None) or config


def tokenizer_json(path: Path, tokenizer: Any) -> dict[str, bytes]:
    """The bundle's tokenizer asset: the model's own tokenizer.json, or the one transformers converted
    from a slow tokenizer."""
    if not getattr(tokenizer, "is_fast", False):
        raise ToolkitError(f"hf:{path}: generation needs a fast tokenizer ({HF_TOKENIZER_FILE}), and transformers found only a slow "
                           "one; install sentencepiece (or tiktoken) so that it converts, or save tokenizer.json with the model.")
    return {HF_TOKENIZER_FILE: (path / HF_TOKENIZER_FILE).read_bytes() if (path / HF_TOKENIZER_FILE).is_file() else
            tokenizer.backend_tokenizer.to_str().encode()}


def generation_config(path: Path, config: Any) -> Any:
    """The directory's generation config, else the one transformers derives from the model config."""
    import transformers

    try:
        return transformers.GenerationConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return transformers.GenerationConfig.from_model_config(config)


# the generation config's token rules that transformers' greedy `generate()` applies, and the
# Generator too (toolkit.runtime.generate): the rest (beams, repetition penalties) are choices of
# sampling, not of the model
_RULES = ("forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens")


def generation_rules(path: Path, config: Any) -> dict[str, Any]:
    """The token rules of the model's generation config, for the manifest's `generation`."""
    generation = generation_config(path, config)
    rules = {}
    for name in _RULES:
        value = getattr(generation, name, None)
        if value is not None and value != []:
            rules[name] = [int(v) for v in value] if isinstance(value, (list, tuple)) else int(value)
    return rules


def chat_template(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer's chat template, with the special tokens it may name (bos_token, eos_token, ...),
    for the manifest's generation section (toolkit.runtime.chat renders it): nothing where it has none.
    Of several named templates, the default one."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not isinstance(template, str):
        return {}
    tokens = {name: value for name, value in (getattr(tokenizer, "special_tokens_map", None) or {}).items() if isinstance(value, str)}
    return {"chat_template": template, "chat_tokens": tokens}


def eos_ids(path: Path, config: Any, tokenizer: Any) -> list[int]:
    """The end-of-text tokens: the generation config's, else the model config's, else the tokenizer's."""
    eos = generation_config(path, config).eos_token_id
    eos = eos if eos is not None else getattr(config, "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    if eos is None:
        raise ToolkitError(f"hf:{path}: no end-of-text token in the generation config, the model config or the tokenizer.")
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _token_windows(tokenizer: Any, texts: list[str], rows: int, length: int) -> np.ndarray:
    """`rows` windows of `length` tokens over the texts run together (no padding: a causal LM needs none)."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        if len(ids) >= rows * length:
            break
    if len(ids) < rows * length:
        ids = (ids * (rows * length // max(len(ids), 1) + 1))
    return np.asarray(ids[: rows * length], dtype=np.int64).reshape(rows, length)




def _CachedLM(model: Any, layers: int) -> Any:

    import torch
    from torch import nn

    class CachedLM(nn.Module):
        """A causal LM over flat cache tensors: (input_ids, attention_mask, position_ids, past_key_0,
        past_value_0, ...) → (logits, present_key_0, present_value_0, ...)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            # transformers 5.2x names the cache argument `cache` (`past_key_values` before)
            self.cache_argument = cache_argument(model)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor):
            cache = dynamic_cache(self.model.config, past)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                             **{self.cache_argument: cache})
            return (out.logits, *(t for kv in cache_tensors(returned_cache(out), layers) for t in kv))

    return CachedLM()


def cache_names(prefix: str, layers: int) -> list[str]:
    """Flat cache tensor names: prefix_key_0, prefix_value_0, prefix_key_1, ..."""
    return [f"{prefix}_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


def cache_argument(model: Any) -> str:
    """The name `model.forward` takes its cache under: transformers 5.2x names it `cache`
    (`past_key_values` before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out: Any) -> Any:
    """The cache a transformers model output returns, under either name."""
    return out.cache if "cache" in out else out.past_key_values


def dynamic_cache(config: Any, flat: tuple[Any, ...]) -> Any:
    """transformers' DynamicCache holding each layer's (keys, values) from `flat`."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=config)
    except TypeError:  # transformers 4.x takes no config
        cache = DynamicCache()
    for layer, (keys, values) in enumerate(zip(flat[0::2], flat[1::2], strict=True)):
        cache.update(keys, values, layer)
    return cache


def cache_tensors(cache: Any, layers: int | None = None) -> list[tuple[Any, Any]]:
    """Each layer's (keys, values) of a transformers cache (the first `layers`), 4.x and 5.x alike."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers[:layers]]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))[:layers]
