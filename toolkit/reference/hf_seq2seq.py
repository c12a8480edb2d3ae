"""Hugging Face encoder-decoders (`*ForConditionalGeneration`: T5, BART, Marian, ..., and speech
models such as Whisper, whose encoder reads log-mel features) in the zoo seq2seq's layout (models/seq2seq.py), so that the Generator, `toolkit generate`, the serve routes and
check's greedy parity drive them unchanged (toolkit.runtime.generate).

The bundle's own graph is the decoder with its KV cache: input_ids, attention_mask over cached and
new tokens, source_mask, per layer the self-attention cache past_key_i/past_value_i and the
cross-attention memory_key_i/memory_value_i → logits and present_key_i/present_value_i. Its part
`encoder` maps source_ids and source_mask (a speech model: input_features, a fixed number of frames,
and the decoder takes no source_mask) to the memory, once per prompt: the encoder, then each
decoder layer's cross-attention projections of its output. Both go through transformers' own
EncoderDecoderCache, so every architecture whose attention reads it works alike. Positions come from
the cache's length (the decoder's rows never need padding: every row starts from the same tokens),
so the decoder graph takes no position_ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.reference.hf_decoder import (
    cache_argument,
    cache_names,
    cache_tensors,
    dynamic_cache,
    eos_ids,
    generation_config,
    generation_rules,
    returned_cache,
    tokenizer_json,
)
from toolkit.reference.samples import sentences, speech_like
from toolkit.spec import Dim, ModelSpec, TensorSpec

__all__ = ["seq2seq_spec"]

_SAMPLE_ROWS = 64
_SOURCE_TOKENS = 48  # longest sample source
_TARGET_TOKENS = 16  # teacher-forced decoder steps of the samples


def seq2seq_spec(path: Path, model: Any, tokenizer: Any, config: Any, architecture: str, context: int, *, audio: bool = False) -> ModelSpec:
    import torch

    start = _decoder_start(path, config)
    argument = cache_argument(model)
    if audio:
        features = _features(path)
        frames = _frames(model, config)
        sources = _audio_sources(features, frames)
        source_inputs = [TensorSpec("input_features", "float32", ("batch", features.feature_size, frames))]
        source_dims: list[Dim] = []
        source_context = None
    else:
        source_context = min(context, getattr(tokenizer, "model_max_length", context) or context)
        sources = _text_sources(tokenizer, min(source_context, _SOURCE_TOKENS))
        source_inputs = [TensorSpec("source_ids", "int64", ("batch", "source"), kind="ids", high=config.vocab_size),
                         TensorSpec("source_mask", "int64", ("batch", "source"), kind="mask")]
        source_dims = [Dim("source", max=source_context, export=6, check=(9, 4))]
    # the caches' shapes, read off a step of the model itself: head counts and sizes are named differently everywhere
    with torch.inference_mode():
        hidden = model.get_encoder()(**_arguments(*(torch.from_numpy(v) for v in sources(1).values()))).last_hidden_state
        out = model(encoder_outputs=(hidden,), decoder_input_ids=torch.tensor([start]), use_cache=True)
    grown = returned_cache(out)
    (_, heads, _, head_size), cross = cache_tensors(grown.self_attention_cache)[0][0].shape, cache_tensors(grown.cross_attention_cache)
    layers = len(cross)
    memory_shape = ("batch", cross[0][0].shape[1], "source" if source_dims else cross[0][0].shape[2], cross[0][0].shape[3])
    encoder = _Encoder(model, start, argument)
    past, memory = cache_names("past", layers), cache_names("memory", layers)
    eos = eos_ids(path, config, tokenizer)
    vocab = model.get_output_embeddings().weight.shape[0]
    decoder = _Decoder(model, layers, hidden.shape[-1], argument, audio)

    def steps(rows: int = _SAMPLE_ROWS) -> dict[str, np.ndarray]:
        """First decoder steps over real text (teacher-forced: the start tokens, then other sentences'
        tokens), on the reference encoder's memory of real sources: what the decoder's gates judge."""
        source = sources(rows)
        targets = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in sentences(2 * rows)[rows:]]
        length = len(start) + _TARGET_TOKENS
        ids = np.array([(start + t * _TARGET_TOKENS)[:length] for t in targets if t] * rows, dtype=np.int64)[:rows]
        with torch.inference_mode():
            cross = encoder(*(torch.from_numpy(value) for value in source.values()))
        empty = np.zeros((rows, heads, 0, head_size), dtype=np.float32)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), **({} if audio else {"source_mask": source["source_mask"]}),
                **dict.fromkeys(past, empty), **{name: t.numpy() for name, t in zip(memory, cross, strict=True)}}

    batch = Dim("batch", export=2, check=(1, 3))
    what = "log-mel features" if audio else "source tokens"
    encoder_spec = ModelSpec(
        module=encoder.eval(),
        inputs=source_inputs,
        outputs=memory,
        dims=[batch, *source_dims],
        task="embed",
        sample_data=sources,
        calibration_data=lambda n: sources(n, offset=_SAMPLE_ROWS),
        description=f"encoder of {architecture} from {path}: {what} → each decoder layer's cross-attention keys and values",
    )
    return ModelSpec(
        module=decoder.eval(),
        inputs=[
            TensorSpec("input_ids", "int64", ("batch", "seq"), kind="ids", high=vocab),
            TensorSpec("attention_mask", "int64", ("batch", "past+seq"), kind="mask"),
            *([] if audio else [TensorSpec("source_mask", "int64", ("batch", "source"), kind="mask")]),
            *(TensorSpec(name, "float32", ("batch", heads, "past", head_size)) for name in past),
            *(TensorSpec(name, "float32", memory_shape) for name in memory),
        ],
        outputs=["logits", *cache_names("present", layers)],
        dims=[batch, Dim("seq", max=context, export=4, check=(5, 3)), Dim("past", min=0, max=context, export=3, check=(0, 7)), *source_dims],
        task="generate",
        description=f"{architecture} from {path} (decoder with a KV cache, encoder as part 'encoder', reading {what})",
        sample_data=steps,
        generation={"tokenizer": "hf", "eos_token_id": eos[0], "eos_token_ids": eos, "context": context, "encoder": "encoder",
                    "decoder_start": start, **generation_rules(path, config),
                    **({"source": "features"} if audio else {"source_context": source_context, "source_special_tokens": True})},
        parts={"encoder": encoder_spec},
        assets=tokenizer_json(path, tokenizer),
    )


def _text_sources(tokenizer: Any, length: int) -> Any:
    def sources(rows: int = _SAMPLE_ROWS, offset: int = 0) -> dict[str, np.ndarray]:
        """Real sentences, tokenized as the model reads a source (with its special tokens), right-padded."""
        encoded = tokenizer(sentences(offset + rows)[offset:], padding=True, truncation=True, max_length=length, return_tensors="np")
        return {"source_ids": encoded["input_ids"].astype(np.int64), "source_mask": encoded["attention_mask"].astype(np.int64)}

    return sources


def _audio_sources(features: Any, frames: int) -> Any:
    def sources(rows: int = _SAMPLE_ROWS, offset: int = 0) -> dict[str, np.ndarray]:
        """Log-mel features, as the model's feature extractor makes them, of speech-like sound."""
        rate = features.sampling_rate
        waves = speech_like(rows, frames * features.hop_length, rate, seed=offset + 1)
        made = features(list(waves), sampling_rate=rate, return_tensors="np")["input_features"]
        return {"input_features": made[..., :frames].astype(np.float32)}

    return sources


def _features(path: Path) -> Any:
    import transformers

    try:
        return transformers.AutoFeatureExtractor.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ToolkitError(f"hf:{path}: a speech model needs its feature extractor's preprocessor_config.json beside the weights: "
                           f"{type(exc).__name__}: {exc}") from exc


def _frames(model: Any, config: Any) -> int:
    """The feature frames the encoder takes (Whisper's is fixed: its position embeddings' count times its convolutions' stride)."""
    import torch

    strides = [m.stride[0] for m in model.get_encoder().modules() if isinstance(m, torch.nn.Conv1d)]
    return int(config.max_source_positions * int(np.prod(strides or [1])))


def _arguments(*source: Any) -> dict[str, Any]:
    """The encoder's keyword arguments: text (source_ids, source_mask), speech (input_features,)."""
    return dict(zip(("input_ids", "attention_mask") if len(source) == 2 else ("input_features",), source, strict=True))


def _decoder_start(path: Path, config: Any) -> list[int]:
    """The tokens every decoder row starts from, as transformers' `generate()` builds them: the decoder
    start token, then the tokens the generation config forces right after it (Whisper's language and
    task) and, for a speech model that knows one, the no-timestamps token (transcription without
    timestamps). A token forced first among the generated ones (BART's `forced_bos_token_id`) is a rule
    of the loop instead (toolkit.runtime.generate)."""
    generation = generation_config(path, config)
    start = next((v for v in (generation.decoder_start_token_id, getattr(config, "decoder_start_token_id", None),
                              getattr(config, "pad_token_id", None)) if v is not None), None)
    if start is None:
        raise ToolkitError(f"hf:{path}: the config names no decoder_start_token_id (nor a pad token to start from).")
    tokens = [int(start[0] if isinstance(start, list) else start)]
    for position, token in sorted(getattr(generation, "forced_decoder_ids", None) or []):
        if position == len(tokens) and token is not None:
            tokens.append(int(token))
    no_timestamps = getattr(generation, "no_timestamps_token_id", None)
    if no_timestamps is not None and no_timestamps not in tokens:
        tokens.append(int(no_timestamps))
    return tokens


def _Encoder(model: Any, start: list[int], argument: str) -> Any:
    import torch
    from torch import nn
    from transformers import EncoderDecoderCache

    class Encoder(nn.Module):
        """source_ids, source_mask → per decoder layer its cross-attention (keys, values), flat: the
        encoder's output, projected by one decoder step that fills the cross-attention cache (the
        rest of that step reaches no output, and the exporter drops it)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *source: torch.Tensor) -> tuple[torch.Tensor, ...]:
            arguments = _arguments(*source)
            hidden = self.model.get_encoder()(**arguments).last_hidden_state
            cache = EncoderDecoderCache(dynamic_cache(self.model.config, ()), dynamic_cache(self.model.config, ()))
            first = torch.tensor([start], dtype=torch.long).expand(hidden.shape[0], -1)
            mask = {"encoder_attention_mask": arguments["attention_mask"]} if "attention_mask" in arguments else {}
            self.model.get_decoder()(input_ids=first, encoder_hidden_states=hidden, use_cache=True, **mask, **{argument: cache})
            return tuple(t for kv in cache_tensors(cache.cross_attention_cache) for t in kv)

    return Encoder()


def _Decoder(model: Any, layers: int, width: int, argument: str, audio: bool) -> Any:
    import torch
    from torch import nn
    from transformers import EncoderDecoderCache

    class Decoder(nn.Module):
        """One decoder step over flat caches: (input_ids, attention_mask, source_mask (text only),
        past_key_0, past_value_0, ..., memory_key_0, memory_value_0, ...) → (logits, present_key_0,
        ...). The cross-attention cache is marked filled, so no layer reads the encoder output: it
        is a zero tensor of the source's shape, which reaches no output."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *rest: torch.Tensor):
            source_mask, caches = (None, rest) if audio else (rest[0], rest[1:])
            cache = EncoderDecoderCache(dynamic_cache(self.model.config, caches[: 2 * layers]), dynamic_cache(self.model.config, caches[2 * layers :]))
            cache.is_updated = dict.fromkeys(range(layers), True)
            unread = torch.zeros((input_ids.shape[0], caches[-1].shape[2], width), dtype=caches[-1].dtype)
            mask = {} if source_mask is None else {"attention_mask": source_mask}
            out = self.model(encoder_outputs=(unread,), decoder_input_ids=input_ids, decoder_attention_mask=attention_mask, use_cache=True,
                             **mask, **{argument: cache})
            return (out.logits, *(t for kv in cache_tensors(returned_cache(out).self_attention_cache, layers) for t in kv))

    return Decoder()
