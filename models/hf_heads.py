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


def _kinds() -> dict[str, tuple[Any, Any, str]]:
    """kind → (config factory, model class, "text" or "image")."""
    import transformers as t

    return {
        "bert-sequence": (lambda v: t.BertConfig(vocab_size=v, num_labels=3, **_TEXT), t.BertForSequenceClassification, "text"),
        "bert-regression": (lambda v: t.BertConfig(vocab_size=v, num_labels=1, **_TEXT), t.BertForSequenceClassification, "text"),
        "bert-token": (lambda v: t.BertConfig(vocab_size=v, num_labels=5, **_TEXT), t.BertForTokenClassification, "text"),
        "bert-masked": (lambda v: t.BertConfig(vocab_size=v, **_TEXT), t.BertForMaskedLM, "text"),
        "bert-answer": (lambda v: t.BertConfig(vocab_size=v, **_TEXT), t.BertForQuestionAnswering, "text"),
        "roberta-token": (lambda v: t.RobertaConfig(vocab_size=v, num_labels=4, pad_token_id=1, **_TEXT), t.RobertaForTokenClassification, "text"),
        "distilbert-sequence": (lambda v: t.DistilBertConfig(vocab_size=v, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=2,
                                                             max_position_embeddings=64), t.DistilBertForSequenceClassification, "text"),
        "vit": (lambda _: t.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=_IMAGE,
                                      patch_size=8, num_labels=10), t.ViTForImageClassification, "image"),
        "resnet": (lambda _: t.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10),
                   t.ResNetForImageClassification, "image"),
        "convnext": (lambda _: t.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10), t.ConvNextForImageClassification, "image"),
        "bart": (lambda v: t.BartConfig(vocab_size=v, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64),
                 t.BartForConditionalGeneration, "text"),
        "t5": (lambda v: t.T5Config(vocab_size=v, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2), t.T5ForConditionalGeneration, "text"),
    }


KINDS = ("bert-sequence", "bert-regression", "bert-token", "bert-masked", "bert-answer", "roberta-token", "distilbert-sequence",
         "vit", "resnet", "convnext", "bart", "t5")


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

    config, model_class, inputs = _kinds()[kind]
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    torch.manual_seed(0)
    if inputs == "text":
        tokenizer = _tokenizer()
        tokenizer.pad_token = tokenizer.eos_token
        model_class(config(len(tokenizer))).eval().save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    else:
        model_class(config(None)).eval().save_pretrained(staging)
        processor = transformers.ViTImageProcessor(size={"height": _IMAGE, "width": _IMAGE}) if kind == "vit" else \
            transformers.ConvNextImageProcessor(size={"shortest_edge": _IMAGE}, crop_pct=0.875)
        processor.save_pretrained(staging)
    staging.rename(path)
