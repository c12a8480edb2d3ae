"""Small Hugging Face causal LMs built offline from seeded configs, each saved with a byte-level BPE
tokenizer trained on Python's own docstrings: GPT-2, LLaMA-style (RoPE, grouped-query attention,
RMSNorm, untied head) and Qwen2-style. Kept under the weights cache, named by this file's contents
and the transformers version, so that their bundles can be reused between test runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

ARCHITECTURES = ("gpt2", "llama", "qwen2")


def causal_lm(kind: str) -> Path:
    """The directory of the small `kind` model, built on first use."""
    import transformers

    from toolkit.reference.source import reference_models

    reference_models()
    from models.digits import cache_dir

    digest = hashlib.sha256(Path(__file__).read_bytes() + transformers.__version__.encode()).hexdigest()[:16]
    path = cache_dir().parent / "hf-models" / f"{kind}-{digest}"
    if not (path / "model.safetensors").is_file():
        _save(kind, path)
    return path


def _save(kind: str, path: Path) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from toolkit.reference.hf import sentences

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(sentences(200), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    ids = {"vocab_size": len(fast), "eos_token_id": fast.eos_token_id, "bos_token_id": fast.eos_token_id}
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 128}
    config, model_class = {
        "gpt2": (lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **ids), transformers.GPT2LMHeadModel),
        "llama": (lambda: transformers.LlamaConfig(**shape, **ids), transformers.LlamaForCausalLM),
        "qwen2": (lambda: transformers.Qwen2Config(**shape, **ids), transformers.Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed(0)
    model = model_class(config()).eval()
    staging = path.with_name(path.name + ".partial")
    model.save_pretrained(staging)
    fast.save_pretrained(staging)
    staging.rename(path)
