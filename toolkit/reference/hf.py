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

    pooling, normalize = _sentence_transformers_head(path)
    max_seq = min(config.max_position_embeddings, getattr(tokenizer, "model_max_length", 10**9))
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
