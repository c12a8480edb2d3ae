"""Hugging Face transformers models from a local directory: `toolkit export hf:PATH`.

The task and the exported outputs come from the config's architecture (`_HEADS`): a classifier of
sequences, tokens, masked tokens, answer spans or images → classify (top-1 gates; per token where
the output is per token), a sequence regressor → regress, a causal LM → generate (a decoder with its
KV cache, toolkit.reference.hf_decoder), a bare encoder (`BertModel`) → embed, where the graph ends
in the sentence embedding: mean (or CLS) pooling over the attention mask, then L2 normalisation
when the directory is a sentence-transformers model that normalises. Any other architecture is an
error that names it and what is supported. Nothing is downloaded (HF_HUB_OFFLINE=1): the directory
must hold the config, the weights and the tokenizer or image processor config.

Weights the checkpoint lacks are initialised randomly by transformers at every load: where the
exported outputs depend on them the export is refused, naming the modules (the reference would not
be the same model twice); where they do not (a pooler an embedding never reads), they are zeroed so
that the weights' hash is stable.

Held-out inputs for the task gates and calibration data are real sentences (Python's own
docstrings, tokenized with the model's tokenizer) or natural-looking images
(toolkit.reference.samples), not random token ids or noise.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.reference.samples import sentences
from toolkit.spec import Dim, ModelSpec, TensorSpec

__all__ = ["PREFIX", "hf_spec", "sentences"]

PREFIX = "hf:"
_FUSABLE = {"bert": "bert", "roberta": "bert", "distilbert": "bert", "xlm-roberta": "bert", "gpt2": "gpt2"}
_SAMPLE_ROWS = 256


@dataclass(frozen=True)
class _Head:
    suffixes: tuple[str, ...]  # architecture names ending so
    task: str
    auto: str  # the transformers Auto class that loads it
    outputs: tuple[str, ...]  # the model output's fields the graph returns, in order
    inputs: str = "text"  # "image": pixel_values from the image processor config; "audio": a speech encoder's features
    encoder_decoder: bool = False


_HEADS = (
    _Head(("ForSequenceClassification",), "classify", "AutoModelForSequenceClassification", ("logits",)),
    _Head(("ForTokenClassification",), "classify", "AutoModelForTokenClassification", ("logits",)),
    _Head(("ForMaskedLM",), "classify", "AutoModelForMaskedLM", ("logits",)),
    _Head(("ForQuestionAnswering",), "classify", "AutoModelForQuestionAnswering", ("start_logits", "end_logits")),
    _Head(("ForImageClassification",), "classify", "AutoModelForImageClassification", ("logits",), "image"),
    _Head(("ForCausalLM", "LMHeadModel"), "generate", "AutoModelForCausalLM", ("logits",)),
    _Head(("ForConditionalGeneration",), "generate", "AutoModelForSeq2SeqLM", ("logits",), encoder_decoder=True),
    _Head(("ForConditionalGeneration",), "generate", "AutoModelForSpeechSeq2Seq", ("logits",), "audio", encoder_decoder=True),
    _Head(("Model",), "embed", "AutoModel", ("last_hidden_state",)),  # a bare text encoder, pooled
)


def hf_spec(path: str | Path, *, trust_remote_code: bool = False) -> ModelSpec:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers
    except ImportError:
        raise ToolkitError("hf: models need the transformers package: pip install 'toolkit[hf]'.") from None

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ToolkitError(f"hf:{path}: no config.json there; give the directory of a saved transformers model.")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    own_code = _own_code(path)
    if own_code and not trust_remote_code:
        raise ToolkitError(f"hf:{path}: the model runs its own code ({own_code}), which transformers would import from its directory; "
                           "pass --trust-remote-code (Python: trust_remote_code=True) if you trust it. It is recorded in the bundle.")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    architecture = (config.architectures or [f"{type(config).__name__.removesuffix('Config')}Model"])[0]
    head = _head(path, architecture, config)
    try:
        # eager attention: the plain MatMul-Softmax form that exports cleanly and that onnxruntime fuses
        model, loading = getattr(transformers, head.auto).from_pretrained(path, local_files_only=True, attn_implementation="eager",
                                                                           output_loading_info=True, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ToolkitError(f"hf:{path}: transformers cannot load it as {architecture}: {type(exc).__name__}: {exc}") from exc
    model.eval()
    if head.inputs == "image":
        from toolkit.reference.hf_vision import image_spec

        spec = image_spec(path, _Outputs(model, ("pixel_values",), head.outputs), config, architecture)
    else:
        spec = _text_spec(path, model, config, architecture, head)
    _settle_missing_weights(path, architecture, spec, model, loading)
    return spec


def _own_code(path: Path) -> str:
    """What code of its own a saved model names (config.json's auto_map: class → module.Class), or ""."""
    try:
        auto_map = json.loads((path / "config.json").read_text(encoding="utf-8")).get("auto_map") or {}
    except (OSError, ValueError):
        return ""
    return ", ".join(f"{k}: {v if isinstance(v, str) else v[0]}" for k, v in sorted(auto_map.items()))


def _head(path: Path, architecture: str, config: Any) -> _Head:
    from transformers.models.auto.modeling_auto import MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES

    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    speech = config.model_type in MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES
    for head in _HEADS:
        if architecture.endswith(head.suffixes) and head.encoder_decoder == encoder_decoder and (head.inputs == "audio") == speech:
            return head
    supported = ", ".join(dict.fromkeys(f"*{suffix}" + (" (encoder-decoders, of text or speech)" if head.encoder_decoder else "")
                                        for head in _HEADS for suffix in head.suffixes))
    raise ToolkitError(f"hf:{path}: architecture {architecture}{' (an encoder-decoder)' if encoder_decoder else ''} is not supported; "
                       f"toolkit exports {supported}.")


def _text_spec(path: Path, model: Any, config: Any, architecture: str, head: _Head) -> ModelSpec:
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ToolkitError(f"hf:{path}: transformers cannot load its tokenizer: {type(exc).__name__}: {exc}") from exc
    limits = [_positions(model, config), getattr(tokenizer, "model_max_length", None)]
    max_seq = min([n for n in limits if n and n < 10**6] or [512])
    if head.encoder_decoder:
        from toolkit.reference.hf_seq2seq import seq2seq_spec

        return seq2seq_spec(path, model, tokenizer, config, architecture, max_seq, audio=head.inputs == "audio")
    if head.task == "generate":
        from toolkit.reference.hf_decoder import causal_lm_spec, group_attention

        group_attention(model)
        return causal_lm_spec(path, model, tokenizer, config, architecture, max_seq)
    ids = TensorSpec("input_ids", "int64", ("batch", "seq"), kind="ids", high=config.vocab_size)
    mask = TensorSpec("attention_mask", "int64", ("batch", "seq"), kind="mask")
    task, outputs = head.task, head.outputs
    if task == "embed":
        pooling, normalize = _sentence_transformers_head(path)
        module, outputs = _Embedder(model, pooling, normalize), ("sentence_embedding",)
        what = f"{pooling}-pooled{', normalised' if normalize else ''} sentence embedding"
    else:
        if head.auto == "AutoModelForSequenceClassification" and (config.problem_type == "regression" or config.num_labels == 1):
            task = "regress"
        module, what = _Outputs(model, ("input_ids", "attention_mask"), outputs), ", ".join(outputs)
    fusion = None
    if config.model_type in _FUSABLE:
        fusion = {"model_type": _FUSABLE[config.model_type], "num_heads": config.num_attention_heads, "hidden_size": config.hidden_size}

    def sample_data() -> dict[str, np.ndarray]:
        return _tokenize(tokenizer, sentences(_SAMPLE_ROWS), max_seq)

    def calibration_data(n: int) -> dict[str, np.ndarray]:
        return _tokenize(tokenizer, sentences(_SAMPLE_ROWS + n)[_SAMPLE_ROWS:], max_seq)

    return ModelSpec(
        module=module.eval(),
        inputs=[ids, mask],
        outputs=outputs,
        dims=[Dim("batch", export=2, check=(1, 3)), Dim("seq", max=max_seq, export=8, check=(5, 17))],
        task=task,
        description=f"{architecture} from {path} ({what})",
        sample_data=sample_data,
        calibration_data=calibration_data,
        fusion=fusion,
        assets=_embedder_tokenizer(path, tokenizer) if task == "embed" else {},
    )


def _positions(model: Any, config: Any) -> int | None:
    """The longest input the position embeddings cover: RoBERTa-style models number positions from
    their padding index + 1, so that many of max_position_embeddings are never a token's."""
    import torch

    size = getattr(config, "max_position_embeddings", None) or getattr(config, "max_target_positions", None)  # Whisper's decoder
    for name, module in model.named_modules():
        if size and name.endswith("position_embeddings") and isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
            return size - module.padding_idx - 1
    return size


def _settle_missing_weights(path: Path, architecture: str, spec: ModelSpec, model: Any, loading: dict[str, Any]) -> None:
    """Weights the checkpoint lacks, which transformers initialises randomly at every load: each
    such module is drawn again in turn and the reference run on two sample rows; the export is
    refused, naming them, where that changes the outputs, and they are zeroed where it does not (a
    pooler the sentence embedding never reads), so that the weights' hash is the same at every load."""
    import torch

    missing = sorted(loading.get("missing_keys") or ())
    if not missing:
        return
    sample = spec.sample_data() if spec.sample_data else {}
    rows = tuple(torch.from_numpy(np.ascontiguousarray(sample[t.name][:2])) for t in spec.inputs) if sample else None

    def outputs() -> list[Any]:
        with torch.inference_mode():
            out = spec.module(*rows)
        return list(out) if isinstance(out, tuple) else [out]

    expected = outputs() if rows else []
    generator = torch.Generator().manual_seed(0)
    read = []
    for module in sorted({key.rpartition(".")[0] for key in missing}):
        tensors = [getattr(model.get_submodule(module), key.rpartition(".")[2]) for key in missing if key.rpartition(".")[0] == module]
        kept = [t.detach().clone() for t in tensors]
        with torch.no_grad():
            for tensor in tensors:  # another draw of what transformers drew at random
                tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
        if not rows or any(not torch.equal(a, b) for a, b in zip(outputs(), expected, strict=True)):
            read.append(module)
        with torch.no_grad():
            for tensor, value in zip(tensors, kept, strict=True):
                tensor.copy_(value)
    if read:
        unused = sorted(loading.get("unexpected_keys") or ())
        raise ToolkitError(
            f"hf:{path}: the checkpoint has no weights for {', '.join(read)}, which transformers then initialises randomly at "
            f"every load, and the {architecture} outputs depend on them: the reference would differ between two loads. Save "
            "the model with those weights (a trained head), or export the architecture it was saved as"
            + (f" (the checkpoint holds weights this one does not read: {', '.join(unused[:6])})." if unused else "."))
    with torch.no_grad():
        for key in missing:
            owner, _, name = key.rpartition(".")
            getattr(model.get_submodule(owner), name).zero_()


def _sentence_transformers_head(path: Path) -> tuple[str, bool]:
    """(pooling, normalize) from a sentence-transformers directory; mean pooling without it."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return "mean", False
    modules = json.loads(modules_file.read_text())
    normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    pooling = "mean"
    for m in modules:
        if m.get("type", "").endswith(".Pooling"):
            settings = json.loads((path / m["path"] / "config.json").read_text())
            if settings.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif not settings.get("pooling_mode_mean_tokens", True):
                raise ToolkitError(f"hf:{path}: pooling {settings} is not supported (mean or CLS only).")
    return pooling, normalize


def _tokenize(tokenizer: Any, texts: list[str], max_seq: int) -> dict[str, np.ndarray]:
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=min(max_seq, 128), return_tensors="np")
    return {"input_ids": encoded["input_ids"].astype(np.int64), "attention_mask": encoded["attention_mask"].astype(np.int64)}


def _Embedder(model: Any, pooling: str, normalize: bool) -> Any:
    import torch
    from torch import nn

    class Embedder(nn.Module):
        """A transformers encoder followed by sentence-transformers' pooling (and normalisation)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:
                weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return nn.functional.normalize(pooled, p=2, dim=1) if normalize else pooled

    return Embedder()


def _Outputs(model: Any, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> Any:
    import torch
    from torch import nn

    # a decoder config's default use_cache=True would trace a cache this graph does not return
    options = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}

    class Outputs(nn.Module):
        """The model's `outputs` fields, called with `inputs` by name."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> Any:
            out = self.model(**dict(zip(inputs, tensors, strict=True)), **options)
            return tuple(out[name] for name in outputs) if len(outputs) > 1 else out[outputs[0]]

    return Outputs()


def _embedder_tokenizer(path: Path, tokenizer: Any) -> dict[str, bytes]:
    """An embedder's tokenizer, carried so that a server can embed text (POST /v1/embeddings): none
    where transformers found only a slow one (the bundle still embeds token ids)."""
    from toolkit.reference.hf_decoder import tokenizer_json

    return tokenizer_json(path, tokenizer) if getattr(tokenizer, "is_fast", False) else {}
