"""Hugging Face transformers models from a local directory: `toolkit export hf:PATH`.

The task comes from the config's architecture: `*ForSequenceClassification` → classify (logits),
`*ForCausalLM` / `*LMHeadModel` → generate (logits), anything else (e.g. `BertModel`) → embed, where
the graph ends in the sentence embedding: mean (or CLS) pooling over the attention mask, then L2
normalisation when the directory is a sentence-transformers model that normalises. Nothing is
downloaded (HF_HUB_OFFLINE=1): the directory must hold the config, weights and tokenizer.

Held-out inputs for the task gates and calibration data are real sentences (Python's own
docstrings, tokenized with the model's tokenizer), not random token ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.runtime.tokenizer import HF_TOKENIZER_FILE
from toolkit.spec import Dim, ModelSpec, TensorSpec

__all__ = ["PREFIX", "hf_spec", "sentences"]

PREFIX = "hf:"
_FUSABLE = {"bert": "bert", "roberta": "bert", "distilbert": "bert", "xlm-roberta": "bert", "gpt2": "gpt2"}
_SAMPLE_ROWS = 256


def hf_spec(path: str | Path) -> ModelSpec:
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
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    architecture = (config.architectures or [""])[0]
    if architecture.endswith("ForSequenceClassification"):
        task, auto = "classify", transformers.AutoModelForSequenceClassification
    elif architecture.endswith(("ForCausalLM", "LMHeadModel")):
        task, auto = "generate", transformers.AutoModelForCausalLM
    else:
        task, auto = "embed", transformers.AutoModel
    try:
        # eager attention: the plain MatMul-Softmax form that exports cleanly and that onnxruntime fuses
        model = auto.from_pretrained(path, local_files_only=True, attn_implementation="eager")
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ToolkitError(f"hf:{path}: transformers cannot load it: {type(exc).__name__}: {exc}") from exc

    max_seq = min(config.max_position_embeddings, getattr(tokenizer, "model_max_length", 10**9))
    if task == "generate":
        _group_attention(model)
        return _causal_lm_spec(path, model, tokenizer, config, architecture, max_seq)
    pooling, normalize = _sentence_transformers_head(path)
    ids = TensorSpec("input_ids", "int64", ("batch", "seq"), kind="ids", high=config.vocab_size)
    mask = TensorSpec("attention_mask", "int64", ("batch", "seq"), kind="mask")
    if task == "embed":
        module, outputs = _Embedder(model, pooling, normalize), ["sentence_embedding"]
        what = f"{pooling}-pooled{', normalised' if normalize else ''} sentence embedding"
    else:
        module, outputs = _Logits(model), ["logits"]
        what = "logits"
    module.eval()
    fusion = None
    if config.model_type in _FUSABLE:
        fusion = {"model_type": _FUSABLE[config.model_type], "num_heads": config.num_attention_heads, "hidden_size": config.hidden_size}

    def sample_data() -> dict[str, np.ndarray]:
        return _tokenize(tokenizer, sentences(_SAMPLE_ROWS), max_seq)

    def calibration_data(n: int) -> dict[str, np.ndarray]:
        return _tokenize(tokenizer, sentences(_SAMPLE_ROWS + n)[_SAMPLE_ROWS:], max_seq)

    return ModelSpec(
        module=module,
        inputs=[ids, mask],
        outputs=outputs,
        dims=[Dim("batch", export=2, check=(1, 3)), Dim("seq", max=max_seq, export=8, check=(5, 17))],
        task=task,
        description=f"{architecture or config.model_type} from {path} ({what})",
        sample_data=sample_data,
        calibration_data=calibration_data,
        fusion=fusion,
    )


def _causal_lm_spec(path: Path, model: Any, tokenizer: Any, config: Any, architecture: str, context: int) -> ModelSpec:
    """A causal LM as a decoder with a KV cache, in the zoo gpt's layout (toolkit.runtime.generate):
    input_ids, attention_mask over cached and new tokens, position_ids and past_key_i/past_value_i
    (batch, key-value heads, past, head size) → logits and present_key_i/present_value_i. The cache
    goes through transformers' own cache class, so every architecture that takes one works alike."""
    text = _text_config(config)
    layers = text.num_hidden_layers
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_size = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    names = [f"{prefix}_{kind}_{i}" for prefix in ("past",) for i in range(layers) for kind in ("key", "value")]
    cache = ("batch", kv_heads, "past", head_size)
    eos = _eos_ids(path, config, tokenizer)
    if not getattr(tokenizer, "is_fast", False):
        raise ToolkitError(f"hf:{path}: generation needs a fast tokenizer ({HF_TOKENIZER_FILE}), and transformers found only a slow "
                           "one; install sentencepiece (or tiktoken) so that it converts, or save tokenizer.json with the model.")
    # the model's own tokenizer.json, or the one transformers converted from a slow tokenizer
    tokenizer_json = (path / HF_TOKENIZER_FILE).read_bytes() if (path / HF_TOKENIZER_FILE).is_file() else \
        tokenizer.backend_tokenizer.to_str().encode()

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
        generation={"tokenizer": "hf", "eos_token_id": eos[0], "eos_token_ids": eos, "context": context},
        assets={HF_TOKENIZER_FILE: tokenizer_json},
    )


_GROUPED_EAGER = "toolkit_grouped_eager"


def _group_attention(model: Any) -> None:
    """Grouped-query attention without copying the cache: transformers' eager attention repeats each
    key-value head for every query head it serves (`repeat_kv`), which in the exported graph is an
    Expand of the whole cache, every layer and every step. Where the model's eager attention is
    exactly the LLaMA family's (compared by source), it is swapped for the same arithmetic over the
    query heads grouped per key-value head (`_grouped_eager_attention`)."""
    import inspect
    import sys

    import transformers
    from transformers.models.llama import modeling_llama

    config = _text_config(model.config)
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


def _text_config(config: Any) -> Any:
    """The language model's own config (multimodal configs nest it)."""
    return getattr(config, "text_config", None) or config


def _eos_ids(path: Path, config: Any, tokenizer: Any) -> list[int]:
    """The end-of-text tokens: the generation config's, else the model config's, else the tokenizer's."""
    import transformers

    try:
        eos = transformers.GenerationConfig.from_pretrained(path, local_files_only=True).eos_token_id
    except (OSError, ValueError):
        eos = None
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


def sentences(n: int) -> list[str]:
    """`n` real English sentences that ship with every Python: the first lines of the standard
    library's docstrings, in a fixed order."""
    import importlib
    import inspect

    found: list[str] = []
    for name in ("os", "json", "collections", "pathlib", "functools", "itertools", "string", "textwrap", "random",
                 "statistics", "datetime", "calendar", "shutil", "tempfile", "csv", "argparse", "logging", "inspect",
                 "typing", "dataclasses", "enum", "heapq", "bisect", "zipfile", "tarfile", "email", "http", "urllib.parse",
                 "subprocess", "threading", "queue", "socket", "decimal", "fractions", "difflib", "pprint", "unittest"):
        module = importlib.import_module(name)
        for _, member in sorted(vars(module).items()):
            doc = inspect.getdoc(member) if callable(member) else None
            line = doc.strip().split("\n\n")[0].replace("\n", " ") if doc else ""
            if 20 <= len(line) <= 300 and line not in found:
                found.append(line)
            if len(found) == n:
                return found
    if len(found) < n:
        raise ToolkitError(f"only {len(found)} sentences found for a held-out set of {n}.")
    return found


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


def _CachedLM(model: Any, layers: int) -> Any:
    import inspect

    import torch
    from torch import nn

    class CachedLM(nn.Module):
        """A causal LM over flat cache tensors: (input_ids, attention_mask, position_ids, past_key_0,
        past_value_0, ...) → (logits, present_key_0, present_value_0, ...)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            # transformers 5.2x names the cache argument `cache` (`past_key_values` before)
            self.cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor):
            cache = _dynamic_cache(self.model.config, past)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                             **{self.cache_argument: cache})
            grown = out.cache if "cache" in out else out.past_key_values
            return (out.logits, *(t for kv in _cache_tensors(grown, layers) for t in kv))

    return CachedLM()


def _dynamic_cache(config: Any, flat: tuple[Any, ...]) -> Any:
    """transformers' DynamicCache holding each layer's (keys, values) from `flat`."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=config)
    except TypeError:  # transformers 4.x takes no config
        cache = DynamicCache()
    for layer, (keys, values) in enumerate(zip(flat[0::2], flat[1::2], strict=True)):
        cache.update(keys, values, layer)
    return cache


def _cache_tensors(cache: Any, layers: int) -> list[tuple[Any, Any]]:
    """Each layer's (keys, values) of a transformers cache, 4.x and 5.x alike."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers[:layers]]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))[:layers]


def _Logits(model: Any) -> Any:
    import torch
    from torch import nn

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return Logits()
