"""Hugging Face models with task heads, built offline from seeded tiny configs (no hub): text
classifiers of sequences, tokens, masked tokens and answer spans (BERT, RoBERTa, DistilBERT), image
classifiers (ViT, ResNet, ConvNeXt, each saved with its image processor config), and architectures
toolkit does not export (BART, T5). Text models share models/hf_causal.py's byte-level BPE tokenizer,
with a pad token. Kept under the weights cache, named by this file's contents and the transformers
version."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

__all__ = ["KINDS", "hf_model"]

_TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}
_IMAGE = 32  # pixels a side
_SEQ2SEQ = {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
            "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_position_embeddings": 64}

# kind → (config class, its settings, model class, "text" or "image"); a text model's config also
# gets the tokenizer's vocabulary size. Class names, so that importing this module needs no transformers.
_MODELS: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "bert-sequence": ("BertConfig", {"num_labels": 3, **_TEXT}, "BertForSequenceClassification", "text"),
    "bert-regression": ("BertConfig", {"num_labels": 1, **_TEXT}, "BertForSequenceClassification", "text"),
    "bert-token": ("BertConfig", {"num_labels": 5, **_TEXT}, "BertForTokenClassification", "text"),
    "bert-masked": ("BertConfig", _TEXT, "BertForMaskedLM", "text"),
    "bert-answer": ("BertConfig", _TEXT, "BertForQuestionAnswering", "text"),
    "roberta-token": ("RobertaConfig", {"num_labels": 4, "pad_token_id": 1, **_TEXT}, "RobertaForTokenClassification", "text"),
    "distilbert-sequence": ("DistilBertConfig", {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "num_labels": 2,
                                                 "max_position_embeddings": 64}, "DistilBertForSequenceClassification", "text"),
    "vit": ("ViTConfig", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                          "image_size": _IMAGE, "patch_size": 8, "num_labels": 10}, "ViTForImageClassification", "image"),
    "resnet": ("ResNetConfig", {"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1], "num_labels": 10},
               "ResNetForImageClassification", "image"),
    "convnext": ("ConvNextConfig", {"num_stages": 2, "hidden_sizes": [16, 32], "depths": [1, 1], "num_labels": 10},
                 "ConvNextForImageClassification", "image"),
    "bart": ("BartConfig", _SEQ2SEQ, "BartForConditionalGeneration", "text"),
    "t5": ("T5Config", {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 1, "num_heads": 2}, "T5ForConditionalGeneration", "text"),
}
KINDS = tuple(_MODELS)


def hf_model(kind: str) -> Path:
    """The directory of the tiny `kind` model, built on first use."""
    import transformers

    from models.digits import cache_dir

    if kind not in KINDS:
        raise ValueError(f"no model {kind!r}: kinds {', '.join(KINDS)}")
    digest = hashlib.sha256(Path(__file__).read_bytes() + transformers.__version__.encode()).hexdigest()[:16]
    path = cache_dir().parent / "hf-models" / f"{kind}-{digest}"
    if not (path / "config.json").is_file():
        _save(kind, path)
    return path


def _save(kind: str, path: Path) -> None:
    import shutil

    import torch
    import transformers

    from models.hf_causal import _tokenizer

    config_class, settings, model_class, inputs = _MODELS[kind]
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    torch.manual_seed(0)
    if inputs == "text":
        tokenizer = _tokenizer()
        tokenizer.pad_token = tokenizer.eos_token
        config = getattr(transformers, config_class)(vocab_size=len(tokenizer), **settings)
        getattr(transformers, model_class)(config).eval().save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    else:
        getattr(transformers, model_class)(getattr(transformers, config_class)(**settings)).eval().save_pretrained(staging)
        processor = transformers.ViTImageProcessor(size={"height": _IMAGE, "width": _IMAGE}) if kind == "vit" else \
            transformers.ConvNextImageProcessor(size={"shortest_edge": _IMAGE}, crop_pct=0.875)
        processor.save_pretrained(staging)
    staging.rename(path)
