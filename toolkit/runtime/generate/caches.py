"""The KV caches one generation call decodes over: the growing cache (the bundle's own graph, each
step fed the cache the last one returned), the in-place cache (toolkit.runtime.inplace: one cache
per call, bound as both past and present) and the static cache (the bundle's part `static`, with
device buffers and captured CUDA graphs on CUDA). Each has `start(feeds)` → the prompt's last
logits and `advance(token)` → the next step's."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.runtime.generate.layout import Layout
from toolkit.runtime.inplace import SEQLENS
from toolkit.runtime.model import Model
from toolkit.runtime.session import ort_message
from toolkit.spec import TensorSpec

__all__ = ["DeviceBuffers", "GrowingCache", "InplaceCache", "StaticCache", "StaticSessions", "bound_step", "step_of"]


def step_of(model: Model, carried: set[str]) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """The loop's step over `model`: on CUDA, the outputs `carried` to the next step (the cache, the
    encoder's memory) stay on the GPU; elsewhere, numpy in and out (the loop builds every feed to
    the spec itself, so no validation)."""
    return bound_step(model, carried) if model.provider == "cuda" else model.run_validated


def bound_step(model: Model, kept: set[str]) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """`model`'s step through IO binding: outputs named in `kept` stay where the session computed
    them (on the GPU for a CUDA session), as OrtValues that later steps take as inputs without a
    round trip through the host; the other outputs come back as numpy arrays."""
    import onnxruntime as ort

    session, names = model.session, [o.name for o in model.outputs]
    device = "cuda" if model.provider == "cuda" else "cpu"

    def step(feeds: Mapping[str, Any]) -> dict[str, Any]:
        binding = session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in names:
            binding.bind_output(name, device if name in kept else "cpu")
        session.run_with_iobinding(binding)
        return {n: v if n in kept else v.numpy() for n, v in zip(names, binding.get_outputs(), strict=True)}

    return step


class GrowingCache:
    """Decoding with the bundle's own graph: each step takes the cache the previous one returned, grown
    by one position (an encoder-decoder's source mask and memory stay as the first step had them)."""

    def __init__(self, step: Callable[[Mapping[str, Any]], dict[str, Any]], layout: Layout):
        self.step, self.layout = step, layout

    def start(self, feeds: dict[str, Any]) -> np.ndarray:
        self.feeds, self.outputs = feeds, self.step(feeds)
        return self.outputs[self.layout.logits][:, -1]

    def advance(self, token: np.ndarray) -> np.ndarray:
        feeds, batch = self.feeds, len(token)
        self.feeds = {
            **feeds,
            "input_ids": token[:, None].astype(np.int64),
            "attention_mask": np.concatenate([feeds["attention_mask"], np.ones((batch, 1), dtype=np.int64)], axis=1),
            **({"position_ids": feeds["position_ids"][:, -1:] + 1} if self.layout.positions else {}),
            **{name: self.outputs["present_" + name.removeprefix("past_")] for name in self.layout.caches},
        }
        self.outputs = self.step(self.feeds)
        return self.outputs[self.layout.logits][:, -1]


class InplaceCache:
    """One call's decoding through the in-place graph (toolkit.runtime.inplace): a cache per past
    input, allocated for the prompt and every new token, bound once as both that step's past and
    its present; each step binds only its tokens, mask and positions."""

    def __init__(self, session: Any, layout: Layout, new_tokens: int, logits: TensorSpec):
        self.session, self.layout, self.new_tokens = session, layout, new_tokens
        self.width, self.dtype = logits.shape[-1], np.dtype(logits.dtype)  # a decode step's logits: (batch, 1, width)
        self.logits = None

    def start(self, feeds: dict[str, Any]) -> np.ndarray:
        import onnxruntime as ort

        layout = self.layout
        batch, length = feeds["input_ids"].shape
        self.binding = self.session.io_binding()
        shape = (batch, layout.heads, length + self.new_tokens, layout.head_size)
        # held here for the call: the binding does not keep its values alive
        self.caches = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=layout.past_dtype)) for _ in layout.caches]
        for name, cache in zip(layout.caches, self.caches, strict=True):
            self.binding.bind_ortvalue_input(name, cache)
            self.binding.bind_ortvalue_output("present_" + name.removeprefix("past_"), cache)
        self.mask, self.positions = feeds["attention_mask"], feeds["position_ids"]
        return self._run(feeds["input_ids"])

    def advance(self, token: np.ndarray) -> np.ndarray:
        self.mask = np.concatenate([self.mask, np.ones((len(token), 1), dtype=np.int64)], axis=1)
        self.positions = self.positions[:, -1:] + 1
        return self._run(token[:, None].astype(np.int64))

    def _run(self, ids: np.ndarray) -> np.ndarray:
        binding, name = self.binding, self.layout.logits
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids))
        binding.bind_cpu_input("attention_mask", self.mask)
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(self.positions))
        binding.bind_cpu_input(SEQLENS, np.full(len(ids), self.mask.shape[1] - 1, dtype=np.int32))  # every row full: padding is masked
        step = ids.shape[1] == 1 and isinstance(self.width, int)
        if step and self.logits is None:  # every decode step writes the same buffer
            import onnxruntime as ort

            self.logits = ort.OrtValue.ortvalue_from_shape_and_type((len(ids), 1, self.width), self.dtype)
            binding.bind_ortvalue_output(name, self.logits)
        elif not step:
            binding.bind_output(name, "cpu")  # the prompt's logits, one row per token
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime's own exception types are not importable portably
            raise ToolkitError(f"onnxruntime failed in a decode step over the in-place cache: {ort_message(exc)}") from exc
        return (self.logits if step else binding.get_outputs()[-1]).numpy()[:, -1]


class StaticSessions:
    """The static-cache graph (the bundle's part `static`): every step writes its tokens into a cache
    preallocated to the context, at `cache_position`, and the mask covers the whole cache. On CUDA,
    one graph is captured per batch size and direction and replayed for every decode step; the
    buffers stay allocated for the next call with that batch size."""

    def __init__(self, model: Model, layout: Layout):
        from toolkit.runtime.graphs import GraphIds

        self.model, self.layout = model, layout
        self.cache_dtype = next(t.dtype for t in model.inputs if t.name == layout.caches[0])
        self.size = next(t.shape[2] for t in model.inputs if t.name == layout.caches[0])
        self._ids = GraphIds()
        self._buffers: dict[int, DeviceBuffers] = {}
        self._lock = threading.Lock()
        self.bound = model.cuda_graph  # through fixed buffers (captured on CUDA); tests set it on the CPU provider too

    def begin(self, stack: contextlib.ExitStack) -> StaticCache:
        """A decode state for one call; through the buffers, it holds them until the call ends."""
        if not self.bound:
            return StaticCache(self, self.model.run_validated)
        stack.enter_context(self._lock)
        return StaticCache(self, None)

    def buffers(self, batch: int) -> DeviceBuffers:
        if batch not in self._buffers:
            self._buffers[batch] = DeviceBuffers(self, batch)
        return self._buffers[batch]


class StaticCache:
    """One call's decoding over the preallocated cache: numpy feeds through `step`, or (step None)
    the device buffers and captured graphs of `sessions`."""

    def __init__(self, sessions: StaticSessions, step: Callable[[Mapping[str, Any]], dict[str, Any]] | None):
        self.sessions, self.step, self.layout = sessions, step, sessions.layout

    def start(self, feeds: dict[str, Any]) -> np.ndarray:
        ids, prompt_mask = feeds["input_ids"], feeds["attention_mask"]
        batch, length = ids.shape
        self.mask = np.zeros((batch, self.sessions.size), dtype=np.int64)
        self.mask[:, :length] = prompt_mask
        self.position = feeds["position_ids"][:, -1:]
        self.length = length
        step = {"input_ids": ids, "attention_mask": self.mask, "position_ids": feeds["position_ids"], "cache_position": np.arange(length)}
        if self.step is None:
            self.device = self.sessions.buffers(batch)
            return self.device.prompt(step)
        empty = np.zeros((batch, self.layout.heads, self.sessions.size, self.layout.head_size), dtype=self.sessions.cache_dtype)
        self.outputs = self.step(step | {name: empty for name in self.layout.caches})
        return self.outputs[self.layout.logits][:, -1]

    def advance(self, token: np.ndarray) -> np.ndarray:
        self.mask[:, self.length] = 1
        self.position = self.position + 1
        step = {"input_ids": token[:, None].astype(np.int64), "attention_mask": self.mask, "position_ids": self.position,
                "cache_position": np.array([self.length])}
        self.length += 1
        if self.step is None:
            return self.device.decode(step)
        self.outputs = self.step(step | {name: self.outputs["present_" + name.removeprefix("past_")] for name in self.layout.caches})
        return self.outputs[self.layout.logits][:, -1]


class DeviceBuffers:
    """A batch size's buffers on the device: the decode step's inputs, two caches that take turns as
    past and present, and the logits; the prompt step runs uncaptured (its length varies), each decode
    direction through a graph of its own."""

    def __init__(self, sessions: StaticSessions, batch: int):
        import onnxruntime as ort

        from toolkit.runtime.graphs import device_of, run_options

        model, layout, self.layout = sessions.model, sessions.layout, sessions.layout
        self.model = model
        device = device_of(model)

        def zeros(shape: tuple[int, ...], dtype: Any) -> Any:
            return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=dtype), device, 0)

        cache = (batch, layout.heads, sessions.size, layout.head_size)
        self.caches = [{name: zeros(cache, sessions.cache_dtype) for name in layout.caches} for _ in range(2)]
        self.inputs = {"input_ids": zeros((batch, 1), np.int64), "attention_mask": zeros((batch, sessions.size), np.int64),
                       "position_ids": zeros((batch, 1), np.int64), "cache_position": zeros((1,), np.int64)}
        logits = next(o for o in model.outputs if o.name == layout.logits)
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type((batch, 1, logits.shape[-1]), np.dtype(logits.dtype), device, 0)
        self.bindings = []
        for past, present in ((0, 1), (1, 0)):
            binding = model.session.io_binding()
            for name, value in self.inputs.items():
                binding.bind_ortvalue_input(name, value)
            for name in layout.caches:
                binding.bind_ortvalue_input(name, self.caches[past][name])
                binding.bind_ortvalue_output("present_" + name.removeprefix("past_"), self.caches[present][name])
            binding.bind_ortvalue_output(layout.logits, self.logits)
            self.bindings.append((binding, run_options(model, sessions._ids.take())))
        self.uncaptured = run_options(model, -1)
        self.turn = 0

    def prompt(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """The prompt step: writes the cache that the first decode step reads as its past."""
        binding = self.model.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.layout.caches:
            binding.bind_ortvalue_input(name, self.caches[1][name])
            binding.bind_ortvalue_output("present_" + name.removeprefix("past_"), self.caches[0][name])
        binding.bind_output(self.layout.logits, "cpu")
        self._run(binding, self.uncaptured)
        self.turn = 0
        return binding.get_outputs()[-1].numpy()[:, -1]

    def decode(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        for name, value in feeds.items():
            self.inputs[name].update_inplace(np.ascontiguousarray(value))
        binding, options = self.bindings[self.turn]
        self._run(binding, options)
        self.turn ^= 1
        return self.logits.numpy()[:, -1]

    def _run(self, binding: Any, options: Any) -> None:
        try:
            self.model.session.run_with_iobinding(binding, options)
        except Exception as exc:  # onnxruntime's own exception types are not importable portably
            raise ToolkitError(f"onnxruntime failed in a decode step of {self.model.name} ({self.model.variant}): {ort_message(exc)}") from exc
