"""The runtime API apps embed: `toolkit.load(DIR, variant=..., provider=...)`.

Never imports torch. Inputs are validated against the manifest before onnxruntime sees them, and
the execution provider in use is read from the session itself: nothing falls back silently.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from toolkit.bundle import Bundle
from toolkit.errors import ToolkitError
from toolkit.runtime.session import open_session, ort_message
from toolkit.spec import TensorSpec

__all__ = ["Model", "Signature", "load"]

def load(path: str | os.PathLike[str] | Bundle, *, variant: str | None = None, provider: str = "auto", threads: int | None = None,
         cuda_graph: bool = False, verify: str | os.PathLike[str] | None = None, key: str | os.PathLike[str] | None = None) -> Model:
    """Opens a bundle's variant on `provider`: "auto" (CUDA when it works), "cpu" or "cuda".

    `variant` defaults to fp32; "best" is the fastest variant that passed its gates, as measured and
    recorded by `toolkit build` (on the provider named in the manifest's `best`). `cuda_graph` (CUDA
    only) opens the session for CUDA graphs: calls through `toolkit.runtime.graphs.CapturedRunner` then
    replay one captured graph per input shape. `verify`, a public key (PEM), refuses a bundle that
    it did not sign or that changed since (`toolkit sign`; needs the sign extra), checked before
    anything is read. `key` (a private key or key file) opens an encrypted bundle (`toolkit encrypt`):
    its files are decrypted in memory only."""
    return Model(path, variant=variant, provider=provider, threads=threads, cuda_graph=cuda_graph, verify=verify, key=key)


class Signature:
    """What a bundle's variant takes and returns, and the checks on its inputs, without a session: a
    server's front end validates requests with it while the model runs elsewhere (another process,
    another machine). Picklable."""

    def __init__(self, bundle: Bundle, variant: str | None = None):
        self.bundle = bundle
        self.variant = _resolve_variant(bundle, variant)
        manifest = bundle.manifest
        variant_record = bundle.variant(self.variant)
        self.inputs: tuple[TensorSpec, ...] = tuple(variant_record.tensors(manifest.inputs))
        self.outputs: tuple[TensorSpec, ...] = tuple(variant_record.tensors(manifest.outputs))
        self._dims = {d.name: d for d in manifest.dims}

    @property
    def name(self) -> str:
        return self.bundle.manifest.name

    def cast(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`feeds` with float arrays in the float dtype this variant's inputs take (an fp16 variant
        with fp16 inputs), other arrays as they are: for callers that hold fp32 data for every variant."""
        dtypes = {t.name: np.dtype(t.dtype) for t in self.inputs}
        return {name: value.astype(dtypes[name]) if name in dtypes and value.dtype.kind == "f" and dtypes[name].kind == "f" else value
                for name, value in feeds.items()}

    def validate(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The feeds as arrays onnxruntime accepts, or a ToolkitError naming the first problem."""
        if not isinstance(feeds, Mapping):
            raise ToolkitError(f"inputs must be a mapping of input name to array, got {type(feeds).__name__}.")
        expected = {t.name: t for t in self.inputs}
        for name in feeds:
            if name not in expected:
                raise ToolkitError(f"unknown input {name!r}; {self.name} takes {_describe_all(self.inputs)}.")
        sizes: dict[str, tuple[int, str]] = {}
        arrays = {}
        for spec in self.inputs:
            if spec.name not in feeds:
                raise ToolkitError(f"missing input {spec.name!r} ({_describe(spec)}); {self.name} takes {_describe_all(self.inputs)}.")
            arrays[spec.name] = self._check_array(spec, feeds[spec.name], sizes)
        for axis, (got, name) in sizes.items():  # an axis that is a sum of dims ("past+seq")
            parts = axis.split("+")
            if len(parts) > 1 and all(p in sizes for p in parts) and got != sum(sizes[p][0] for p in parts):
                terms = " + ".join(f"{p} {sizes[p][0]}" for p in parts)
                raise ToolkitError(f"input {name!r}: its {axis} axis is {got}, but {terms} = {sum(sizes[p][0] for p in parts)}.")
        return arrays

    def _check_array(self, spec: TensorSpec, value: Any, sizes: dict[str, tuple[int, str]]) -> np.ndarray:
        if isinstance(value, (list, tuple, int, float)):
            value = np.asarray(value, dtype=spec.dtype)  # plain Python data carries no dtype intent
        elif not isinstance(value, np.ndarray):
            value = np.asarray(value)
        if value.dtype != np.dtype(spec.dtype):
            raise ToolkitError(
                f"input {spec.name!r}: expected dtype {spec.dtype}, got {value.dtype} "
                f"(convert with .astype(np.{spec.dtype}))."
            )
        if value.ndim != len(spec.shape):
            raise ToolkitError(
                f"input {spec.name!r}: expected rank {len(spec.shape)} with shape {_shape(spec.shape)}, "
                f"got rank {value.ndim} with shape {tuple(value.shape)}."
            )
        for axis, (want, got) in enumerate(zip(spec.shape, value.shape, strict=True)):
            if isinstance(want, int):
                if got != want:
                    raise ToolkitError(
                        f"input {spec.name!r}: axis {axis} must be {want}, got {got} "
                        f"(expected shape {_shape(spec.shape)}, got {tuple(value.shape)})."
                    )
                continue
            dim = self._dims.get(want)
            if dim is not None and (got < dim.min or (dim.max is not None and got > dim.max)):
                bound = f"[{dim.min}, {dim.max}]" if dim.max is not None else f">= {dim.min}"
                raise ToolkitError(f"input {spec.name!r}: axis {axis} ({want}) is {got}; {want} must be {bound}.")
            seen = sizes.setdefault(want, (got, spec.name))
            if seen[0] != got:
                raise ToolkitError(
                    f"input {spec.name!r}: axis {axis} ({want}) is {got}, but input {seen[1]!r} has {want} = {seen[0]}."
                )
        if spec.kind in ("ids", "positions") and value.size:
            low, high = int(value.min()), int(value.max())
            if low < 0 or high >= spec.high:
                what = "token ids" if spec.kind == "ids" else "positions"
                raise ToolkitError(
                    f"input {spec.name!r}: {what} must lie in [0, {spec.high}), got values in [{low}, {high}]."
                )
        return np.ascontiguousarray(value)

class Model(Signature):
    """One variant of a bundle in an onnxruntime session. Safe to call from several threads."""

    def __init__(self, path: str | os.PathLike[str] | Bundle, *, variant: str | None = None, provider: str = "auto", threads: int | None = None,
                 cuda_graph: bool = False, verify: str | os.PathLike[str] | None = None, key: str | os.PathLike[str] | None = None):
        if verify is not None:
            from toolkit.bundle.signing import verify as verify_signature

            verify_signature(path.path if isinstance(path, Bundle) else path, verify)  # before anything is decrypted
        super().__init__(Bundle.of(path, key=key), variant)
        graph = self.bundle.graph(self.variant)
        self._session, self.provider, self.provider_note = open_session(graph, provider, threads, cuda_graph=cuda_graph)
        _check_described(self, self._session)
        self.cuda_graph = cuda_graph and self.provider == "cuda"

    @property
    def session(self) -> Any:
        """The underlying onnxruntime.InferenceSession, for what this class does not wrap (IO binding)."""
        return self._session

    def run(self, feeds: Mapping[str, Any], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Runs one inference; returns {output name: array} for `outputs` (default: all)."""
        self._live_session()
        arrays = self.validate(feeds)
        names = [o.name for o in self.outputs] if outputs is None else list(outputs)
        unknown = [n for n in names if n not in {o.name for o in self.outputs}]
        if unknown:
            raise ToolkitError(f"unknown output {unknown[0]!r}; {self.name} has outputs {', '.join(o.name for o in self.outputs)}.")
        return self.run_validated(arrays, names)

    def run_validated(self, arrays: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """`run` without the checks, for feeds that `validate` returned or that the caller built to the
        spec itself (a decoding loop, a batch merged from validated requests)."""
        names = [o.name for o in self.outputs] if outputs is None else list(outputs)
        try:
            values = self._live_session().run(names, arrays)
        except Exception as exc:  # onnxruntime's own exception types are not importable portably
            raise ToolkitError(f"onnxruntime failed running {self.name} ({self.variant}): {ort_message(exc)}") from exc
        return dict(zip(names, values, strict=True))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """`model(x)` for a single-input model, `model(name=value, ...)` otherwise; returns the
        array for a single-output model, else a dict."""
        if args:
            if len(args) != 1 or kwargs or len(self.inputs) != 1:
                raise ToolkitError(
                    f"{self.name} takes inputs {_describe_all(self.inputs)}; pass them by name: "
                    f"model({', '.join(t.name + '=...' for t in self.inputs)}) or model.run({{...}})."
                )
            kwargs = {self.inputs[0].name: args[0]}
        result = self.run(kwargs)
        return next(iter(result.values())) if len(result) == 1 else result

    def close(self) -> None:
        self._session = None

    def _live_session(self) -> Any:
        if self._session is None:
            raise ToolkitError(f"{self.name} ({self.variant}) is closed: its session was released (a Generator opened on the bundle "
                               "releases it when it decodes over the in-place cache). Load the bundle again to run it.")
        return self._session

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Model({self.bundle.path}, variant={self.variant!r}, provider={self.provider!r})"


_ORT_TYPES = {"float32": "float", "float64": "double"}


def _check_described(signature: Signature, session: Any) -> None:
    """Refuses a manifest that does not describe its graph (names, dtypes, ranks, fixed sizes): every
    stage after loading trusts the manifest's signature, so it must be the graph's."""
    for kind, described, actual in (("input", signature.inputs, session.get_inputs()), ("output", signature.outputs, session.get_outputs())):
        graph = {a.name: a for a in actual}
        if {t.name for t in described} != set(graph):
            raise ToolkitError(f"bundle {signature.bundle.path}: its manifest lists {kind}s {sorted(t.name for t in described)}, but variant "
                               f"{signature.variant!r}'s graph has {sorted(graph)}; the manifest was altered or belongs to another graph.")
        for spec in described:
            node = graph[spec.name]
            want = f"tensor({_ORT_TYPES.get(spec.dtype, spec.dtype)})"
            fixed = [(s, g) for s, g in zip(spec.shape, node.shape or [], strict=False) if isinstance(s, int) and isinstance(g, int)]
            if node.type != want or len(node.shape or []) != len(spec.shape) or any(s != g for s, g in fixed):
                raise ToolkitError(f"bundle {signature.bundle.path}: its manifest describes {kind} {spec.name!r} as {spec.dtype} "
                                   f"{list(spec.shape)}, but variant {signature.variant!r}'s graph has {node.type} {node.shape}.")


def _resolve_variant(bundle: Bundle, variant: str | None) -> str:
    if variant != "best":
        return variant or "fp32"
    best = bundle.manifest.best
    if not best:
        raise ToolkitError(
            f"bundle {bundle.path} has no 'best' variant recorded: `toolkit build` measures and records one. "
            f"Pass a variant by name instead; its variants: {', '.join(bundle.manifest.variants)}."
        )
    name = best["variant"]
    parity = bundle.variant(name).parity
    if not parity or not parity["passed"]:
        state = "has not been checked" if not parity else "fails its gates"
        raise ToolkitError(
            f"bundle {bundle.path}: 'best' is variant {name!r}, which {state} now; it cannot serve as best. "
            f"Run `toolkit check {bundle.path}` and choose again with `toolkit build`, or pass a variant by name."
        )
    return name


def _shape(shape: Sequence[int | str]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _describe(spec: TensorSpec) -> str:
    return f"{spec.dtype} {_shape(spec.shape)}"


def _describe_all(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(f"{t.name} ({_describe(t)})" for t in specs)
