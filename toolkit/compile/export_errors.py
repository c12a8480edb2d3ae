"""Why an export failed, in a few lines: the cause torch's exporters name (its "Exception summary",
ANSI colour codes stripped), the operator it has no translation for, the line of the model's code it
happened at (installed packages included: a model's code often lives in one), and what to try.

The line comes from the exception's frames where the model's Python ran (torch.export traces it);
where the failure is in the conversion of the traced graph, from running the model once more and
catching the first call of the function the converter names (a built-in through the profiler hook,
an aten op through a dispatch mode), whose caller is the model's line, however deep in its
packages; else from the stack trace torch.export recorded on the node."""

from __future__ import annotations

import inspect
import linecache
import os
import re
import sys
import sysconfig
import traceback
from collections.abc import Callable
from typing import Any

from toolkit.errors import ToolkitError

__all__ = ["check_signature", "describe_failure"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CLASS = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")
_NODE = re.compile(r"Error when translating node %(\w+)")
_TARGET = re.compile(r"call_function\[target=([\w.]+)\]")
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
_OPS = (
    re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'"),
    re.compile(r"No ONNX function found for (<built-in function \w+>|[\w.:]+)"),
    re.compile(r"unrecognized namespace ([\w.]+::\w+)"),
    re.compile(r"Exporting the operator '([^']+)' to ONNX opset version \d+ is not supported"),
    re.compile(r"[Uu]nsupported (?:operator|ONNX opset version)[^']*'([^']+)'"),
    re.compile(r"(?:Unsupported FX nodes|Unsupported operator)[^{]*\{'([^']+)'"),
)
_DATA_DEPENDENT = ("DataDependentOutputException", "GuardOnDataDependentSymNode", "data-dependent", "data dependent")


def describe_failure(model: str, exporter: str, exc: BaseException, *, suggest_torchscript: bool = False,
                     graph_of: Callable[[], Any] | None = None, run: Callable[[], Any] | None = None) -> str:
    """What failed, the operator or the model's line it failed at, and what to try. `graph_of`
    traces the model again with torch.export, `run` runs it eagerly: for the line of a node the
    converter names."""
    chain = _chain(exc)
    text = _ANSI.sub("", "\n".join(f"{type(e).__name__}: {e}" for e in chain))
    lines = [f"the {exporter} exporter could not export {model}."]
    if isinstance(chain[0], ToolkitError):  # toolkit's own check of the result: its message explains
        cause = str(chain[0])
    else:
        cause = (_summary(text) or next((f"{type(e).__name__}: {_first_line(e)}" for e in reversed(chain) if _first_line(e)),
                                        type(chain[-1]).__name__))[:400]
    lines.append(f"  cause: {cause}")
    op = next((m.group(1) for p in _OPS for m in [p.search(text)] if m), None)
    if op:
        lines.append(f"  operator: {op.replace('.', '::', 1) if op[0] != '<' and '::' not in op else op} has no ONNX translation")
    specialised = [ln.strip() for ln in text.splitlines() if "specialized" in ln or "Not all values of" in ln]
    lines += [f"  {ln}" for ln in dict.fromkeys(specialised)][:4]
    where = _model_frame(chain)
    node = _NODE.search(text)
    target = _TARGET.search(text)
    called = target.group(1) if target else op.replace("::", ".") if op and re.fullmatch(r"\w+::\w+", op) else None
    if where is None and called and run is not None:
        where = _caller_of(run, called)
    if where is None and node and graph_of is not None:
        where = _node_frame(graph_of, node.group(1))
    if where:
        lines.append(f"  at: {where}")
    data_dependent = any(word in text for word in _DATA_DEPENDENT)
    if op:
        lines.append("  try: compute it with tensor ops the exporter knows (Python's round() on a .item() → torch.round on the "
                     "tensor), or register an ONNX translation for it (torch.onnx.export's custom_translation_table).")
    elif data_dependent:
        lines.append("  try: the code branches on a tensor's values (torch.equal, `if x.sum() > 0`, .item()), which a graph "
                     "cannot: compute both sides and pick with torch.where, or decide outside forward.")
    elif specialised:
        lines.append("  try: remove the code that fixes that size, or declare the dim fixed in the spec.")
    if suggest_torchscript:
        lines.append("  try: --exporter torchscript")
    lines.append("  (--debug shows the full traceback)")
    return "\n".join(lines)


def check_signature(spec: Any) -> None:
    """The spec's inputs against `forward`'s parameters, before any exporter runs: each input is
    passed by position, so the counts must fit, and the same names in another order are a mistake."""
    import torch

    module = spec.module
    names = [t.name for t in spec.inputs]
    if isinstance(module, torch.jit.ScriptModule):
        params = [(a.name, a.has_default_value()) for a in module.forward.schema.arguments[1:]]
        varargs = False
    else:
        try:
            signature = inspect.signature(module.forward)
        except (TypeError, ValueError):
            return
        kinds = signature.parameters.values()
        params = [(p.name, p.default is not p.empty) for p in kinds if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        varargs = any(p.kind is p.VAR_POSITIONAL for p in kinds)
    where = f"{type(module).__name__}.forward({', '.join(n for n, _ in params)}{', *…' if varargs else ''})"
    required = [n for n, has_default in params if not has_default]
    if len(names) > len(params) and not varargs:
        raise ToolkitError(f"the spec has {len(names)} inputs ({', '.join(names)}) but {where} takes {len(params)}: "
                           f"remove {', '.join(names[len(params):])} from the spec, or take them in forward.")
    if len(names) < len(required):
        raise ToolkitError(f"{where} needs {len(required)} inputs but the spec has {len(names)} ({', '.join(names) or 'none'}): "
                           f"add {', '.join(required[len(names):])} to the spec.")
    ordered = [n for n, _ in params[: len(names)]]
    if sorted(ordered) == sorted(names) and ordered != names:
        raise ToolkitError(f"the spec's inputs ({', '.join(names)}) are in another order than {where}'s parameters; inputs are "
                           "passed by position: list them in forward's order.")


def _chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while exc is not None and all(exc is not seen for seen in chain):
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _first_line(exc: BaseException) -> str:
    return next((ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()), "")


def _summary(text: str) -> str | None:
    """The innermost cause in torch's "## Exception summary" section, as `Type: message`."""
    if "## Exception summary" not in text:
        return None
    section = text.split("## Exception summary", 1)[1].split("(Refer to", 1)[0]
    causes = [_CLASS.sub(r"\1", ln.strip()) for ln in section.splitlines() if ln.strip().startswith("<class")]
    return causes[0] if causes else None


def _tooling_roots() -> tuple[str, ...]:
    """Directories whose frames are never the model's: Python's own library, torch and the ONNX
    tooling, and this toolkit."""
    import torch

    import toolkit

    roots = [sysconfig.get_paths()["stdlib"], os.path.dirname(torch.__file__), os.path.dirname(toolkit.__file__)]
    for name in ("onnx", "onnxscript", "onnx_ir", "functorch", "sympy"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            roots.append(os.path.dirname(module.__file__))
    return tuple(os.path.realpath(r) + os.sep for r in roots)


def _is_model_code(filename: str, roots: tuple[str, ...]) -> bool:
    return not filename.startswith("<") and not os.path.realpath(filename).startswith(roots)


def _model_frame(chain: list[BaseException]) -> str | None:
    """The innermost frame of the model's code in any traceback of the chain, as `file:line in
    function: source`."""
    roots = _tooling_roots()
    frames = [f for e in chain for f in traceback.extract_tb(e.__traceback__) if _is_model_code(f.filename, roots)]
    if not frames:
        return None
    frame = frames[-1]
    return _format(frame.filename, frame.lineno, frame.name)


def _node_frame(graph_of: Callable[[], Any], node_name: str) -> str | None:
    """The model's line that made `node_name` in the graph torch.export traces, from the stack
    trace it records on each node."""
    try:
        program = graph_of()
    except Exception:  # the converter failed after torch.export had succeeded: this rarely fails, and then says nothing new
        return None
    node = next((n for n in program.graph.nodes if n.name == node_name), None)
    trace = (node.meta.get("stack_trace") or "") if node is not None else ""
    roots = _tooling_roots()
    frames = [m for m in _FRAME.finditer(trace) if _is_model_code(m.group(1), roots)]
    return _format(frames[-1].group(1), int(frames[-1].group(2)), frames[-1].group(3)) if frames else None


def _caller_of(run: Callable[[], Any], target: str) -> str | None:
    """The model's line that first calls `target` ("builtins.round", "aten.equal.default") when
    `run` runs the model."""
    import builtins

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    roots = _tooling_roots()
    found: list[str] = []

    def innermost(frame: Any) -> None:
        while frame is not None and not found:
            if _is_model_code(frame.f_code.co_filename, roots):
                found.append(_format(frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
            frame = frame.f_back

    class Catch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's protocol)
            if not found and target in (str(func), str(func).rsplit(".", 1)[0]):
                innermost(sys._getframe(1))
            return func(*args, **(kwargs or {}))

    builtin = getattr(builtins, target.removeprefix("builtins."), None) if target.startswith("builtins.") else None

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and arg is builtin and not found:
            innermost(frame)

    previous = sys.getprofile()
    try:
        with torch.no_grad(), Catch():
            sys.setprofile(profile if builtin is not None else previous)
            run()
    except Exception:  # noqa: S110 (the model failed on its own: no line to name from here)
        pass
    finally:
        sys.setprofile(previous)
    return found[0] if found else None


def _format(filename: str, line: int, function: str) -> str:
    source = linecache.getline(filename, line).strip()
    return f"{filename}:{line} in {function}" + (f": {source}" if source else "")
