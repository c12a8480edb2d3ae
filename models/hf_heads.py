"""Hugging Face models with task heads, built offline from seeded tiny configs (no hub): text
classifiers of sequences, tokens, masked tokens and answer spans (BERT, RoBERTa, DistilBERT), image
classifiers (ViT, ResNet, ConvNeXt, each saved with its image processor config), encoder-decoders
of text (BART, T5) and speech (Whisper, with its feature extractor config: 16 mel bins over one
second). Text models share models/hf_causal.py's byte-level BPE tokenizer, with a pad token; the
encoder-decoders' weights are drawn wider than transformers' defaults, so that their greedy tokens
vary instead of repeating one token. Kept under the weights cache, named by this file's contents and the transformers
version."""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path
from typing import Any

__all__ = ["KINDS", "hf_model"]

_TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}
_IMAGE = 32  # pixels a side
_SEQ2SEQ = {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
            "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_position_embeddings": 64}

# kind → (config class, its settings, model class, "text", "image" or "audio"); a text or speech model's
# config also gets the tokenizer's vocabulary size. Class names, so that importing this module needs no transformers.
_MODELS: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "bert-sequence": ("BertConfig", {"num_labels": 3, **_TEXT}, "BertForSequenceClassification", "text"),
    "bert-regression": ("BertConfig", {"num_labels": 1, **_TEXT}, "BertForSequenceClassification", "text"),
    "bert-token": ("BertConfig", {"num_labels": 5, **_TEXT}, "BertForTokenClassification", "text"),
    "bert-masked": ("BertConfig", _TEXT, "BertForMaskedLM", "text"),
    "bert-answer": ("BertConfig", _TEXT, "BertForQuestionAnswering", "text"),
    "bert-embed": ("BertConfig", _TEXT, "BertModel", "text"),
    "roberta-token": ("RobertaConfig", {"num_labels": 4, "pad_token_id": 1, **_TEXT}, "RobertaForTokenClassification", "text"),
    "distilbert-sequence": ("DistilBertConfig", {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "num_labels": 2,
                                                 "max_position_embeddings": 64}, "DistilBertForSequenceClassification", "text"),
    "vit": ("ViTConfig", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                          "image_size": _IMAGE, "patch_size": 8, "num_labels": 10}, "ViTForImageClassification", "image"),
    "resnet": ("ResNetConfig", {"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1], "num_labels": 10},
               "ResNetForImageClassification", "image"),
    "convnext": ("ConvNextConfig", {"num_stages": 2, "hidden_sizes": [16, 32], "depths": [1, 1], "num_labels": 10},
                 "ConvNextForImageClassification", "image"),
    "bart": ("BartConfig", {**_SEQ2SEQ, "init_std": 0.2}, "BartForConditionalGeneration", "text"),
    "whisper": ("WhisperConfig", {**_SEQ2SEQ, "num_mel_bins": 16, "max_source_positions": 50, "max_target_positions": 64,
                                  "init_std": 0.2, "begin_suppress_tokens": [5], "suppress_tokens": [7]},
                "WhisperForConditionalGeneration", "audio"),
    "t5": ("T5Config", {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 2, "initializer_factor": 8.0},
           "T5ForConditionalGeneration", "text"),
}
KINDS = tuple(_MODELS)


def hf_model(kind: str) -> Path:
    """The directory of the tiny `kind` model, built on first use."""
    import transformers

    from models.digits import cache_dir, save_directory_once

    if kind not in KINDS:
        raise ValueError(f"no model {kind!r}: kinds {', '.join(KINDS)}")
    digest = hashlib.sha256(Path(__file__).read_bytes() + transformers.__version__.encode()).hexdigest()[:16]
    path = cache_dir().parent / "hf-models" / f"{kind}-{digest}"
    if not (path / "config.json").is_file():
        save_directory_once(path, partial(_save, kind))
    return path


def _save(kind: str, staging: Path) -> None:
    import torch
    import transformers

    from models.hf_causal import _tokenizer

    config_class, settings, model_class, inputs = _MODELS[kind]
    torch.manual_seed(0)
    if inputs in ("text", "audio"):
        tokenizer = _tokenizer()
        tokenizer.pad_token = tokenizer.eos_token
        special = {}
        if model_class.endswith("ForConditionalGeneration"):  # the tokenizer's own ids, not the config class's defaults
            special = dict.fromkeys(("pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id", "forced_eos_token_id"),
                                    tokenizer.eos_token_id)
        config = getattr(transformers, config_class)(vocab_size=len(tokenizer), **settings, **special)
        getattr(transformers, model_class)(config).eval().save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if inputs == "audio":  # one second of 16 kHz sound, 100 frames: the encoder's 2 × 50 positions
            transformers.WhisperFeatureExtractor(feature_size=16, chunk_length=1).save_pretrained(staging)
    else:
        getattr(transformers, model_class)(getattr(transformers, config_class)(**settings)).eval().save_pretrained(staging)
        processor = transformers.ViTImageProcessor(size={"height": _IMAGE, "width": _IMAGE}) if kind == "vit" else \
            transformers.ConvNextImageProcessor(size={"shortest_edge": _IMAGE}, crop_pct=0.875)
        processor.save_pretrained(staging)
