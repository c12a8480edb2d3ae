"""Stage `export`: a PyTorch model (zoo name or `package.module:factory`) → a bundle with variant fp32."""

from __future__ import annotations

import contextlib
import gc
import inspect
import io
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from toolkit import __version__
from toolkit._scoped import logger_level
from toolkit.bundle import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Bundle,
    Manifest,
    Source,
    Variant,
    is_safe_name,
    safe_name,
    sha256_file,
    staged_directory,
)
from toolkit.bundle.trust import remember
from toolkit.compile.export_errors import check_signature, describe_failure
from toolkit.errors import CheckFailed, ToolkitError
from toolkit.reference.source import resolve, source_of, weights_sha256
from toolkit.runtime.samples import make_feeds
from toolkit.spec import Dim, ModelSpec, TensorSpec, shape_cases

__all__ = ["DEFAULT_OPSET", "EXPORTERS", "export", "trace"]

EXPORTERS = ("auto", "dynamo", "torchscript")
DEFAULT_OPSET = 18
FP32_FILE = "model.fp32.onnx"

Progress = Callable[[str], None]


def export(
    model: str,
    out: str | Path,
    *,
    preset: str | None = None,
    name: str | None = None,
    static_cache: bool = False,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
    verbose: bool = False,
    isolate: bool = True,
    trust_remote_code: bool = False,
) -> Bundle:
    """Exports `model` to a new bundle at `out` (replaced only with `force`), written atomically.
    `name` names the bundle (in serving URLs and Triton repositories; default: from the model).
    `static_cache` also exports a decoder's static-cache graph (`ModelSpec.generation["static"]`,
    the part CUDA graphs replay); without it a CPU deployment does not pay for a second graph.

    `exporter="auto"` uses the dynamo exporter and falls back to TorchScript, saying so through
    `progress` and in the variant's recipe. `verbose` lets the exporters' own output through.
    With `isolate` (the default) the model is traced in a fresh Python process: torch's exporters
    keep process-wide state, and a second LSTM export in one process silently gets its sequence
    length fixed (torch 2.13), so an export must not depend on what ran before it. Pass
    `isolate=False` for a factory that only exists in this process (e.g. defined in a notebook).
    `trust_remote_code` lets a Hugging Face model run its own code (recorded in the manifest's source).
    """
    if exporter not in EXPORTERS:
        raise ToolkitError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}.")
    if not 7 <= opset <= 23:
        raise ToolkitError(f"--opset {opset} is out of range; the exporters support opsets 7 to 23 (default {DEFAULT_OPSET}).")
    say = progress or (lambda _msg: None)
    out = Path(out)
    source = source_of(model, preset, trust_remote_code=trust_remote_code)
    if name is not None and safe_name(name) != name:
        raise ToolkitError(f"--name {name!r}: use letters, digits, '_', '.' and '-' only (it ends up in URLs and directory "
                           f"names), e.g. {safe_name(name)!r}.")
    with staged_directory(out, overwrite=force) as staging:
        manifest = _export_into(staging, source, name=name, static_cache=static_cache, opset=opset,
                                exporter=exporter, verbose=verbose, isolate=isolate, say=say)
    say(f"wrote {out} (variant fp32, {manifest.variants['fp32'].bytes / 1e6:.2f} MB, exporter "
        f"{manifest.variants['fp32'].recipe['options']['exporter']}{', parts ' + ', '.join(manifest.parts) if manifest.parts else ''})")
    bundle = Bundle.open(out, trust_source=True)  # the caller named the model: its reference may be rebuilt
    remember(bundle)  # from now on too, while it names the same code (toolkit.bundle.trust)
    return bundle


def _snapshot_record(source: Source) -> dict[str, Any]:
    """A hub model's snapshot as the manifest records it: repo, commit and every file's sha256."""
    if not source.hub or source.part:
        return {}
    from toolkit.reference.hub import snapshot_files

    return {"snapshot": {"repo": source.hub, "revision": source.revision, "files": snapshot_files(Path(source.path))}}


def _export_into(directory: Path, source: Source, *, name: str | None, static_cache: bool, opset: int, exporter: str, verbose: bool,
                 isolate: bool, say: Progress) -> Manifest:
    """Writes the bundle of `source` into the empty `directory`, and its parts' bundles into
    subdirectories; `name` (default: the spec's, else from the source) names it."""
    request = {"source": source.to_json(), "opset": opset, "exporter": exporter, "directory": str(directory), "verbose": verbose}
    info = _trace_isolated(request, say) if isolate else trace(**request, progress=say)
    name = name or (safe_name(info["name"]) if info["name"] else source.default_name())
    generation, parts = info["generation"], info["parts"]
    if generation and "static" in generation and not static_cache:
        parts = [p for p in parts if p != generation["static"]]
        generation = {k: v for k, v in generation.items() if k != "static"}
    options: dict[str, Any] = {"exporter": info["exporter"], "opset": opset}
    if info["fallback_reason"]:
        options["fallback_reason"] = info["fallback_reason"]
    manifest = Manifest(
        name=name,
        description=info["description"],
        source=source,
        task=info["task"],
        opset=opset,
        inputs=[TensorSpec.from_json(t) for t in info["inputs"]],
        outputs=[TensorSpec.from_json(t) for t in info["outputs"]],
        dims=[Dim.from_json(name, d) for name, d in info["dims"].items()],
        fusion=info["fusion"],
        generation=generation,
        parts=parts,
        reference={"weights_sha256": info["weights_sha256"], **_snapshot_record(source)},
        variants={"fp32": _variant(directory, FP32_FILE, info["external"], {"stage": "export", "options": options, "parent": None})},
        versions=info["versions"],
        assets={name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size} for name in info["assets"]},
    )
    for part in manifest.parts:
        say(f"exporting part {part}")
        (directory / part).mkdir()
        if source.pruned:  # each part's bundle rebuilds the same pruned model
            shutil.copyfile(directory / source.pruned, directory / part / source.pruned)
        _export_into(directory / part, source.with_part(part), name=f"{name}-{part}", static_cache=static_cache, opset=opset,
                     exporter=exporter, verbose=verbose, isolate=isolate, say=say)
    Bundle(directory, manifest).save()
    return manifest


def trace(*, source: dict[str, Any], opset: int, exporter: str, directory: str, verbose: bool, progress: Progress) -> dict[str, Any]:
    """In this process: builds the model, exports it to `directory`/model.fp32.onnx, validates it,
    and returns what the manifest needs (JSON-serialisable, so a worker process can send it)."""
    result = _export_file(source=source, opset=opset, exporter=exporter, directory=directory, verbose=verbose, say=progress)
    # The checker reads the file once the PyTorch model and the proto are gone (they lived in
    # _export_file): one copy of the weights, onnx's own, where there were three at the export's peak.
    gc.collect()
    progress("validating the ONNX model (onnx.checker, full check)")
    import onnx

    try:
        onnx.checker.check_model(str(Path(directory) / FP32_FILE), full_check=True)
    except Exception as exc:
        raise ToolkitError(f"the exported model of {Source.from_json(source).describe()} fails onnx.checker: {exc}") from exc
    return result


def _export_file(*, source: dict[str, Any], opset: int, exporter: str, directory: str, verbose: bool, say: Progress) -> dict[str, Any]:
    """Builds the model and writes its ONNX export to `directory`; returns what the manifest needs."""
    source = Source.from_json(source)
    model = source.describe()
    say(f"building the PyTorch reference for {model}")
    spec = resolve(source, Path(directory))

    import torch

    check_signature(spec)
    if spec.sample_data is None and spec.eval_data is None:
        say(f"warning: {model} has no sample_data (nor eval_data): its task gates will be judged on synthetic inputs, which a "
            "trained model may treat unlike real ones; give ModelSpec.sample_data (README, \"Your own model\")")
    proto, used, fallback_reason = None, "dynamo", None
    if isinstance(spec.module, torch.jit.ScriptModule):
        why = (f"{model} is a TorchScript module (torch.jit.ScriptModule): the dynamo exporter traces Python code, which a "
               "ScriptModule no longer runs")
        if exporter == "dynamo":
            raise ToolkitError(f"{why}; export it with --exporter torchscript (or auto).")
        if exporter == "auto":
            fallback_reason, exporter = why, "torchscript"
            say(f"{why}: exporting with the TorchScript exporter")
    if exporter in ("auto", "dynamo"):
        say("exporting with the dynamo exporter (torch.export)")
        try:
            proto = _export_dynamo(spec, opset, verbose)
            # Some torch versions specialise a dynamic dim without failing (the LSTM's seq on torch
            # 2.11): that is a failed export too, and TorchScript may still keep the dim dynamic.
            inputs, outputs = _graph_io(proto, spec)
        except Exception as exc:  # the exporters raise many types; all end in a message
            proto = None
            if verbose:  # --debug: torch's own account, which the fallback would otherwise hide
                traceback.print_exception(exc, file=sys.stderr)
            if exporter == "dynamo":
                raise ToolkitError(_dynamo_failure(model, spec, exc, suggest_torchscript=True)) from exc
            fallback_reason = _dynamo_failure(model, spec, exc, suggest_torchscript=False)
            say(f"the dynamo exporter failed ({fallback_reason.splitlines()[1].strip()}); trying the TorchScript exporter")
    if proto is None:
        if exporter == "torchscript":
            say("exporting with the TorchScript exporter")
        used = "torchscript"
        try:
            proto = _export_torchscript(spec, opset, verbose)
            inputs, outputs = _graph_io(proto, spec)
        except Exception as exc:
            message = describe_failure(model, "torchscript", exc, run=lambda: spec.module(*_example_args(spec)))
            raise ToolkitError(f"{fallback_reason}\n\n{message}" if fallback_reason else message) from exc

    from toolkit._onnx import save_model

    external = save_model(proto, Path(directory) / FP32_FILE)
    return {
        "exporter": used,
        "fallback_reason": fallback_reason,
        "task": spec.task,
        "name": spec.name,
        "description": spec.description,
        "inputs": [t.to_json() for t in inputs],
        "outputs": [t.to_json() for t in outputs],
        "dims": {d.name: d.to_json() for d in spec.dims},
        "fusion": spec.fusion,
        "generation": spec.generation,
        "parts": list(spec.parts),
        "assets": _write_assets(spec.assets, Path(directory)),
        "weights_sha256": weights_sha256(spec.module),
        "external": external,
        "versions": _versions(),
    }


_WORKER_TAG = "@@toolkit-export "


def _trace_isolated(request: dict[str, Any], say: Progress) -> dict[str, Any]:
    """Runs `trace` in a fresh interpreter (toolkit.compile.export_worker) and relays its progress."""
    env = dict(os.environ)
    # The worker must import what this process can: the user's package may sit on sys.path only.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["PYTHONSAFEPATH"] = "1"  # and not the working directory, which `-m` would put first
    with tempfile.TemporaryFile("w+") as stderr:
        worker = subprocess.Popen(
            [sys.executable, "-m", "toolkit.compile.export_worker", json.dumps(request)],
            stdout=subprocess.PIPE, stderr=None if request["verbose"] else stderr, text=True, env=env,
        )
        reply: dict[str, Any] = {}
        try:
            for line in worker.stdout:
                if not line.startswith(_WORKER_TAG):
                    if request["verbose"]:
                        print(line, end="", file=sys.stderr)
                    continue
                message = json.loads(line[len(_WORKER_TAG):])
                if "progress" in message:
                    say(message["progress"])
                else:
                    reply = message
        finally:
            worker.wait()
            worker.stdout.close()
        if "result" in reply:
            return reply["result"]
        if "error" in reply:
            error = (CheckFailed if reply["exit_code"] == CheckFailed.exit_code else ToolkitError)(reply["error"])
            error.worker_traceback = reply["traceback"]
            raise error
        stderr.seek(0)
        raise ToolkitError(f"the export worker died (exit code {worker.returncode}) without a result:\n{stderr.read()[-3000:]}")


def _write_assets(assets: Mapping[str, bytes], directory: Path) -> list[str]:
    """Writes each asset into the bundle directory; → their names."""
    for name, content in assets.items():
        if not is_safe_name(name) or name in (MANIFEST_NAME, SIGNATURE_NAME) or name.endswith(".onnx"):
            raise ToolkitError(f"asset name {name!r} must be a plain file name, not a graph or the manifest.")
        (directory / name).write_bytes(content)
    return list(assets)


def _variant(directory: Path, file: str, external: list[str], recipe: dict[str, Any]) -> Variant:
    path = directory / file
    return Variant(
        file=file,
        sha256=sha256_file(path),
        bytes=path.stat().st_size + sum((directory / e).stat().st_size for e in external),
        recipe=recipe,
        external_data=[{"file": e, "sha256": sha256_file(directory / e), "bytes": (directory / e).stat().st_size} for e in external],
    )


def _dynamo_failure(model: str, spec: ModelSpec, exc: BaseException, *, suggest_torchscript: bool) -> str:
    def traced() -> Any:  # for the source line of a node the ONNX converter could not translate
        import torch

        with _quiet(False), torch.no_grad():
            return torch.export.export(spec.module, _example_args(spec), dynamic_shapes=_dynamic_shapes(spec), strict=False)

    def run() -> Any:
        return spec.module(*_example_args(spec))

    return describe_failure(model, "dynamo", exc, suggest_torchscript=suggest_torchscript, graph_of=traced, run=run)


def _example_args(spec: ModelSpec) -> tuple[Any, ...]:
    import torch

    feeds = make_feeds(spec.inputs, {d.name: d.export for d in spec.dims}, seed=0)
    return tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)


def _dynamic_shapes(spec: ModelSpec) -> tuple[Any, ...]:
    import torch

    dims = {d.name: torch.export.Dim(d.name, min=d.min, **({"max": d.max} if d.max is not None else {})) for d in spec.dims}
    # An axis that is a sum of dims ("past+seq") is left for torch.export to relate to the others.
    dynamic_shapes = tuple({axis: dims.get(d, torch.export.Dim.DYNAMIC) for axis, d in enumerate(t.shape) if isinstance(d, str)} or None
                           for t in spec.inputs)
    # torch.export wants the shapes nested as the signature is: a forward(*args) takes one tuple.
    params = inspect.signature(spec.module.forward).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        named = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
        dynamic_shapes = (*dynamic_shapes[:named], dynamic_shapes[named:])
    return dynamic_shapes


def _export_dynamo(spec: ModelSpec, opset: int, verbose: bool):
    import torch

    dynamic_shapes = _dynamic_shapes(spec)
    with _quiet(verbose), torch.no_grad():
        program = torch.onnx.export(
            spec.module,
            _example_args(spec),
            dynamo=True,
            input_names=[t.name for t in spec.inputs],
            output_names=list(spec.outputs),
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            verbose=verbose,
        )
    return program.model_proto


def _export_torchscript(spec: ModelSpec, opset: int, verbose: bool):
    import onnx
    import torch

    buffer = io.BytesIO()
    dynamic_axes = {t.name: {axis: d for axis, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs}
    with _quiet(verbose), torch.no_grad():
        torch.onnx.export(
            spec.module,
            _example_args(spec),
            buffer,
            dynamo=False,
            input_names=[t.name for t in spec.inputs],
            output_names=list(spec.outputs),
            dynamic_axes={k: v for k, v in dynamic_axes.items() if v},
            opset_version=opset,
            verbose=verbose,
        )
    return onnx.load_from_string(buffer.getvalue())


def _graph_io(proto: Any, spec: ModelSpec) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Checks the graph's inputs against the spec; returns (inputs, outputs) for the manifest."""
    from toolkit._onnx import value_dtype, value_shape

    graph_inputs = {v.name: v for v in proto.graph.input}
    for t in spec.inputs:
        if t.name not in graph_inputs:
            raise ToolkitError(
                f"the exported graph has no input {t.name!r} (it has {', '.join(graph_inputs) or 'none'}): "
                "the exporter drops inputs the model's forward does not use. Remove it from the spec or use it."
            )
        value = graph_inputs[t.name]
        shape, dtype = value_shape(value), value_dtype(value)
        if dtype != t.dtype:
            raise ToolkitError(f"input {t.name!r} was exported as {dtype}, the spec says {t.dtype}.")
        if len(shape) != len(t.shape):
            raise ToolkitError(f"input {t.name!r} was exported with rank {len(shape)}, the spec says {len(t.shape)}.")
        for axis, (got, want) in enumerate(zip(shape, t.shape, strict=True)):
            if isinstance(want, str) and isinstance(got, int):
                raise ToolkitError(
                    f"input {t.name!r} axis {axis} was meant to be dynamic ({want}) but was exported as the "
                    f"constant {got}: the model's code fixes that size."
                )
        # Name dynamic axes as the spec does, whatever symbol the exporter chose.
        for axis, want in enumerate(t.shape):
            if isinstance(want, str):
                value.type.tensor_type.shape.dim[axis].dim_param = want
    names = [v.name for v in proto.graph.output]
    if names != list(spec.outputs):
        raise ToolkitError(f"the exported graph has outputs {names}, the spec says {list(spec.outputs)}.")
    return list(spec.inputs), _named_outputs(proto, spec)


def _named_outputs(proto: Any, spec: ModelSpec) -> list[TensorSpec]:
    """Output specs whose axes are what the model's outputs are at run time, dynamic ones carrying
    the spec's dim names.

    Exporters name output axes after internal nodes (e.g. `MatMullogits_dim_1`), and the TorchScript
    exporter may record the export's batch as a fixed size, or name an axis that never changes; the
    reference run at the two check sizes tells which dim each axis follows, or that it is fixed.
    """
    import torch

    from toolkit._onnx import value_dtype, value_shape

    cases = shape_cases(spec.dims)
    shapes = []
    for sizes in cases:
        feeds = make_feeds(spec.inputs, sizes, seed=0)
        try:
            with torch.no_grad():
                result = spec.module(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))
        except Exception as exc:
            raise ToolkitError(
                f"the PyTorch model itself fails at sizes {sizes} ({type(exc).__name__}: {exc}); "
                "a dim declared dynamic must work at its check sizes. Fix the model or its spec's dims."
            ) from exc
        shapes.append([tuple(r.shape) for r in (result if isinstance(result, (tuple, list)) else (result,))])
    # An output axis is named after the dim (or the inputs' sum of dims, "past+seq") that it follows.
    names = [*cases[0], *dict.fromkeys(d for t in spec.inputs for d in t.shape if isinstance(d, str) and "+" in d)]
    outputs = []
    for index, value in enumerate(proto.graph.output):
        shape = list(value_shape(value))
        if len(shape) != len(shapes[0][index]):
            raise ToolkitError(f"output {value.name!r} was exported with rank {len(shape)}, but the model returns rank "
                               f"{len(shapes[0][index])}: the exporter misread the model.")
        for axis, dim in enumerate(shape):
            seen = tuple(case[index][axis] for case in shapes)
            follows = next((n for n in names if tuple(sum(c[p] for p in n.split("+")) for c in cases) == seen), None)
            if len(set(seen)) == 1 and follows is None:
                if isinstance(dim, int) and dim != seen[0]:
                    raise ToolkitError(f"output {value.name!r} axis {axis} was exported as {dim}, but the model returns "
                                       f"{seen[0]} there: the exporter misread the model.")
                shape[axis] = seen[0]  # fixed, whatever name the exporter gave it
                value.type.tensor_type.shape.dim[axis].dim_value = seen[0]
            else:  # dynamic: named after its dim (an exporter may have recorded the export's size instead), or
                # one of its own where it is not a dim or a sum of dims (8 × seq, flattened)
                shape[axis] = follows or (dim if isinstance(dim, str) else f"{value.name}_dim_{axis}")
                value.type.tensor_type.shape.dim[axis].dim_param = shape[axis]
        outputs.append(TensorSpec(value.name, value_dtype(value), tuple(shape)))
    return outputs


def _versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime
    import torch

    return {
        "toolkit": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Keeps the exporters' progress lines, IR dumps and deprecation chatter off the user's terminal.

    The TorchScript exporter prints from C++, so file descriptors 1 and 2 are redirected too.
    """
    if verbose:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with tempfile.TemporaryFile() as sink, warnings.catch_warnings(), logger_level("torch.onnx", logging.ERROR):
            warnings.simplefilter("ignore")
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
