"""The caches a continuous batch decodes over: one row per running sequence, each at its own length.
Rows join (`add`: the sequence's prompt runs alone and its cache takes a row) and leave (`remove`:
the last row moves into the freed one), and `decode` runs one step for every row at once.

- `InplaceSlots` (CPU, the graphs toolkit.runtime.inplace rewrites: fused rotary decoders): one
  cache per past input, allocated once for `slots` rows of the model's whole context and written in
  place. Every row's tokens start at position 0 of its row and GroupQueryAttention reads each row to
  its own length (the graph's `seqlens_k`), so nothing is padded or copied per step; the running
  rows are always the first ones, so a step binds a prefix of each cache. A prompt may also come in
  pieces (`feed`, then `commit`), into a row of its own beside them, while they keep decoding.
- `PaddedSlots` (every other decoder graph: GPT-2's attention, unfused or fp16 variants,
  encoder-decoders, the CUDA provider): the bundle's own graph over one left-padded batch (the
  layout `Generator` uses for a batch of prompts), whose cache grows a step at a time. A row that
  joins is padded on the left to the batch's length (or pads the others to its own); an
  encoder-decoder's memory and source mask are padded on the right. Leaving trims the padding that
  no row needs any more.

Both give a row exactly the logits it would have alone: its padding is masked, its positions its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.runtime.generate.layout import Layout
from toolkit.runtime.inplace import SEQLENS
from toolkit.runtime.session import ort_message
from toolkit.spec import TensorSpec

__all__ = ["InplaceSlots", "PaddedSlots"]

Step = Callable[[Mapping[str, Any]], dict[str, Any]]


class InplaceSlots:
    """`slots` rows of the in-place graph's cache, each `capacity` tokens long."""

    def __init__(self, session: Any, layout: Layout, slots: int, capacity: int, logits: TensorSpec):
        self.session, self.layout, self.slots = session, layout, slots
        shape = (slots + 1, layout.heads, capacity, layout.head_size)  # the last row stages a prompt fed in pieces
        self.caches = [np.zeros(shape, dtype=layout.past_dtype) for _ in layout.caches]
        self.lengths = np.zeros(slots, dtype=np.int64)  # tokens in each row's cache
        self.rows = 0
        self.logits = np.zeros((slots, 1, logits.shape[-1]), dtype=np.dtype(logits.dtype))
        self._bound = -1  # the rows the decode binding's caches cover
        self._binding = session.io_binding()

    def add(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """Runs one prompt (feeds of batch 1, no padding) into the next free row; its last logits."""
        ids = feeds["input_ids"][0]
        logits = self._prompt(self.rows, ids, 0)
        self.lengths[self.rows] = len(ids)
        self.rows += 1
        return logits

    def feed(self, ids: np.ndarray, start: int) -> np.ndarray:
        """Writes a piece of a prompt, `ids` at positions `start`..., into the staging row (the
        running rows are not touched); the piece's last logits."""
        return self._prompt(self.slots, ids, start)

    def _prompt(self, row: int, ids: np.ndarray, start: int) -> np.ndarray:
        end = start + len(ids)
        binding = self.session.io_binding()
        self._bind_caches(binding, slice(row, row + 1))
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64)[None])
        binding.bind_cpu_input("attention_mask", np.ones((1, end), dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.arange(start, end)[None])
        binding.bind_cpu_input(SEQLENS, np.array([end - 1], dtype=np.int32))
        binding.bind_output(self.layout.logits, "cpu")
        self._run(binding)
        return binding.get_outputs()[-1].numpy()[:, -1]

    def commit(self, length: int) -> None:
        """The staged prompt, `length` tokens, becomes the next running row."""
        for cache in self.caches:
            cache[self.rows, :, :length] = cache[self.slots, :, :length]
        self.lengths[self.rows] = length
        self.rows += 1

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """One step for every row: `tokens` (rows,) → logits (rows, vocab)."""
        rows, lengths = self.rows, self.lengths[: self.rows]
        binding = self._binding
        if self._bound != rows:
            self._bind_caches(binding, slice(0, rows))
            from onnxruntime import OrtValue

            binding.bind_ortvalue_output(self.layout.logits, OrtValue.ortvalue_from_numpy(self.logits[:rows]))
            self._bound = rows
        width = int(lengths.max()) + 1
        binding.bind_cpu_input("input_ids", tokens[:, None].astype(np.int64))
        binding.bind_cpu_input("attention_mask", (np.arange(width) <= lengths[:, None]).astype(np.int64))
        binding.bind_cpu_input("position_ids", lengths[:, None].copy())
        binding.bind_cpu_input(SEQLENS, lengths.astype(np.int32))
        self._run(binding)
        lengths += 1
        return self.logits[:rows, 0]

    def remove(self, row: int) -> None:
        """Frees `row`: the last row's cache moves into it."""
        last = self.rows - 1
        if row != last:
            filled = int(self.lengths[last])
            for cache in self.caches:
                cache[row, :, :filled] = cache[last, :, :filled]
            self.lengths[row] = self.lengths[last]
        self.rows -= 1

    def clear(self) -> None:
        self.rows = 0

    def _bind_caches(self, binding: Any, rows: slice) -> None:
        from onnxruntime import OrtValue

        for name, cache in zip(self.layout.caches, self.caches, strict=True):
            value = OrtValue.ortvalue_from_numpy(cache[rows])  # a view: the kernel writes the rows in place
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output("present_" + name.removeprefix("past_"), value)

    def _run(self, binding: Any) -> None:
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime's own exception types are not importable portably
            raise ToolkitError(f"onnxruntime failed in a decode step over the cache slots: {ort_message(exc)}") from exc


class PaddedSlots:
    """Rows of one left-padded batch over the bundle's graph (`step`: feeds → outputs, numpy)."""

    def __init__(self, step: Step, layout: Layout, inputs: Sequence[TensorSpec], slots: int):
        self.step, self.layout, self.slots = step, layout, slots
        self.rows = 0
        self.past: dict[str, np.ndarray] = {}  # (rows, heads, past, size), left-padded
        self.mask = np.zeros((0, 0), dtype=np.int64)  # (rows, past)
        self.positions = np.zeros(0, dtype=np.int64)  # the next token's position, per row
        self.constants: dict[str, np.ndarray] = {}  # an encoder-decoder's memory and source mask, right-padded
        # a constant's axes that hold the source (padded on the right), from the graph's own dims
        source = next((t.shape[1] for t in inputs if t.name == "source_mask"), None)
        self._source_axes = {t.name: [i for i, d in enumerate(t.shape) if d == source and isinstance(d, str)] for t in inputs}

    def add(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """Runs one prompt's first step (feeds of batch 1, as Generator builds them) and adds its row."""
        layout = self.layout
        outputs = self.step(feeds)
        mask = feeds["attention_mask"]
        past = {name: outputs["present_" + name.removeprefix("past_")] for name in layout.caches}
        constants = {name: value for name, value in feeds.items()
                     if name not in layout.caches and name not in ("input_ids", "attention_mask", "position_ids")}
        self._join(past, mask, int(feeds["position_ids"][0, -1]) + 1 if layout.positions else 0, constants)
        return outputs[layout.logits][:, -1]

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        layout, rows = self.layout, self.rows
        mask = np.concatenate([self.mask, np.ones((rows, 1), dtype=np.int64)], axis=1)
        feeds = {"input_ids": tokens[:, None].astype(np.int64), "attention_mask": mask, **self.past, **self.constants}
        if layout.positions:
            feeds["position_ids"] = self.positions[:, None].copy()
        outputs = self.step(feeds)
        self.past = {name: outputs["present_" + name.removeprefix("past_")] for name in layout.caches}
        self.mask = mask
        self.positions = self.positions + 1
        return outputs[layout.logits][:, -1]

    def remove(self, row: int) -> None:
        keep = np.arange(self.rows)
        keep[row] = self.rows - 1
        keep = keep[:-1]
        self.rows -= 1
        self.mask, self.positions = self.mask[keep], self.positions[keep]
        self.past = {name: value[keep] for name, value in self.past.items()}
        self.constants = {name: value[keep] for name, value in self.constants.items()}
        if self.rows:
            first = int(self.mask.any(0).argmax())  # padding every row has on the left goes
            if first:
                self.mask = self.mask[:, first:]
                self.past = {name: value[:, :, first:] for name, value in self.past.items()}

    def clear(self) -> None:
        self.rows, self.past, self.constants = 0, {}, {}

    def _join(self, past: dict[str, np.ndarray], mask: np.ndarray, position: int, constants: dict[str, np.ndarray]) -> None:
        if not self.rows:
            self.past, self.mask, self.positions, self.constants = past, mask, np.array([position]), constants
            self.rows = 1
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.past = {name: np.concatenate([_left(self.past[name], width, 2), _left(past[name], width, 2)]) for name in past}
        self.mask = np.concatenate([_left(self.mask, width, 1), _left(mask, width, 1)])
        self.positions = np.append(self.positions, position)
        joined = {}
        for name, value in constants.items():
            ours = self.constants[name]
            for axis in self._source_axes.get(name, []):
                size = max(ours.shape[axis], value.shape[axis])
                ours, value = _right(ours, size, axis), _right(value, size, axis)
            joined[name] = np.concatenate([ours, value])
        self.constants = joined
        self.rows += 1


def _left(array: np.ndarray, size: int, axis: int) -> np.ndarray:
    """`array` padded with zeros on the left of `axis` to `size`."""
    return _pad(array, size, axis, left=True)


def _right(array: np.ndarray, size: int, axis: int) -> np.ndarray:
    return _pad(array, size, axis, left=False)


def _pad(array: np.ndarray, size: int, axis: int, *, left: bool) -> np.ndarray:
    pad = size - array.shape[axis]
    if not pad:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (pad, 0) if left else (0, pad)
    return np.pad(array, widths)
