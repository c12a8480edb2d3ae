"""Hugging Face causal LMs built offline from seeded configs (no hub), each saved with a byte-level
BPE tokenizer trained on Python's own docstrings: GPT-2, LLaMA-style (RoPE, grouped-query
attention, RMSNorm, untied head), Mistral, Qwen2 and Phi (partial rotary, parallel attention and
MLP, LayerNorm). Sizes: "tiny" for the tests, "mid" (a 56M LLaMA: benchmarks/build_memory.py) and
"small" (about GPT-2 small's 124M parameters: benchmarks/peers.py). Kept under the weights cache, named by this file's contents and the transformers
version, so that their bundles can be reused between runs."""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path
from typing import Any

__all__ = ["ARCHITECTURES", "CHAT_TEMPLATE", "SIZES", "causal_lm"]

ARCHITECTURES = ("gpt2", "llama", "mistral", "qwen2", "phi")
# per size: (hidden, intermediate, layers, heads, key-value heads, vocabulary, context)
SIZES = {"tiny": (64, 128, 2, 4, 2, None, 128), "mid": (512, 1408, 8, 8, 4, 32000, 1024), "small": (768, 2048, 12, 12, 4, 32000, 1024)}
_GPT2_SMALL_VOCAB = 50257


def causal_lm(kind: str, size: str = "tiny") -> Path:
    """The directory of the `size` `kind` model, built on first use."""
    import transformers

    from models.digits import cache_dir, save_directory_once

    if kind not in ARCHITECTURES or size not in SIZES:
        raise ValueError(f"no {size!r} {kind!r}: kinds {', '.join(ARCHITECTURES)}; sizes {', '.join(SIZES)}")
    digest = hashlib.sha256(Path(__file__).read_bytes() + transformers.__version__.encode()).hexdigest()[:16]
    path = cache_dir().parent / "hf-models" / f"{kind}-{size}-{digest}"
    if not (path / "config.json").is_file():
        save_directory_once(path, partial(_save, kind, size))
    return path


def _save(kind: str, size: str, staging: Path) -> None:
    import torch
    import transformers

    fast = _tokenizer()
    hidden, intermediate, layers, heads, kv_heads, vocab, context = SIZES[size]
    ids = {"eos_token_id": fast.eos_token_id, "bos_token_id": fast.eos_token_id}
    vocab = vocab or len(fast)
    shape = {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
             "num_key_value_heads": kv_heads, "max_position_embeddings": context, "vocab_size": vocab, **ids}
    configs: dict[str, tuple[Any, Any]] = {
        "gpt2": (lambda: transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=context,
                                                 vocab_size=_GPT2_SMALL_VOCAB if size == "small" else vocab, **ids),
                 transformers.GPT2LMHeadModel),
        "llama": (lambda: transformers.LlamaConfig(**shape), transformers.LlamaForCausalLM),
        "mistral": (lambda: transformers.MistralConfig(**shape, sliding_window=None), transformers.MistralForCausalLM),
        "qwen2": (lambda: transformers.Qwen2Config(**shape), transformers.Qwen2ForCausalLM),
        "phi": (lambda: transformers.PhiConfig(**shape, partial_rotary_factor=0.5), transformers.PhiForCausalLM),
    }
    config, model_class = configs[kind]
    torch.manual_seed(0)
    model = model_class(config()).eval()
    model.save_pretrained(staging)
    fast.save_pretrained(staging)


def _tokenizer() -> Any:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from toolkit.reference.hf import sentences

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(sentences(200), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ChatML (Qwen2's form): a chat model's template, so that served models are tried with one
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
