"""Stage `prune`: a PyTorch model → a smaller one, with whole channels, hidden units and attention
heads removed (structured pruning, so the graph really shrinks), exported as a bundle of its own.

Torch-Pruning's dependency graph finds which layers' channels must go together (a Linear's outputs
and the next one's inputs, a convolution and its successors) and ranks them by importance (`l1`:
weight magnitude; `taylor`: |weight × gradient| on the model's own held-out inputs). toolkit decides
which of those groups may be pruned at all:

- never one that changes the shape of an input or output of any of the model's graphs: the pruned
  model keeps the bundle's interface (a classifier's classes, a decoder's KV cache layout);
- never one whose channels pass through a product of two activations (attention's q·kᵀ and
  scores·v), which the dependency graph maps wrongly; heads are pruned instead, whole, by the
  attention module's own hooks (`head_parameters(head)`, `prune_heads(heads)`, see README);
- never one that breaks the model: each group is pruned on its own, every graph run at its export
  sizes, and the group put back (`_Saved`) when a forward fails (a width the model also uses as a
  number), an output changes shape, or a tied weight would split;
- nn.LSTM hidden units through a pruner of our own (Torch-Pruning's handles one layer, and not its
  recurrent weights' inputs): the same units of every layer, as an nn.LSTM needs one hidden size;
- transformers' Conv1D (GPT-2) as the nn.Linear it computes, put back as a Conv1D afterwards.

Every group kept whole is recorded with its reason, as is every layer that shrank. Zoo models with
a training recipe (ModelSpec.fine_tune) are fine-tuned briefly; the bundle then carries parity of its
graph against the pruned PyTorch model and a task gate of the pruned model against the unpruned one
(tolerance profile `pruned`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.bundle import Bundle, sha256_file, staged_directory
from toolkit.bundle.trust import remember
from toolkit.compile.exporter import DEFAULT_OPSET, _example_args, _export_into
from toolkit.compile.parity import check, heldout_of, judge_task, reference_accuracy
from toolkit.compile.tolerances import profile
from toolkit.errors import ToolkitError
from toolkit.reference import pruned
from toolkit.reference.source import resolve, source_of
from toolkit.spec import ModelSpec

__all__ = ["METHODS", "prune"]

METHODS = ("l1", "taylor")
_TAYLOR_ROWS = 64

Progress = Callable[[str], None]


def prune(
    model: str,
    out: str | Path,
    *,
    amount: float,
    method: str = "l1",
    preset: str | None = None,
    name: str | None = None,
    fine_tune: bool = True,
    round_to: int = 1,
    force: bool = False,
    progress: Progress | None = None,
) -> Bundle:
    """Prunes `amount` (0 < amount < 1) of the channels of every prunable group and of the heads of
    every prunable attention module of `model` (a zoo name, package.module:factory or hf:PATH),
    fine-tunes it where the model has a recipe, and writes it to a new bundle at `out` (replaced only
    with `force`) with variant fp32 checked against the pruned model. `round_to` N > 1 leaves every
    pruned group a multiple of N channels (rounded down; a group of N or fewer is left whole), for
    kernels that work in blocks of channels. The manifest's `pruning` holds
    what was removed and kept, sizes and MACs before and after, and the task gate against the
    unpruned model; a gate that fails is recorded, not raised (`manifest.pruning["gate"]["passed"]`)."""
    if not 0 < amount < 1:
        raise ToolkitError(f"--amount {amount:g} is out of range: give the share of channels to remove, between 0 and 1 (e.g. 0.3).")
    if round_to < 1:
        raise ToolkitError(f"--round-to {round_to} is out of range: give a channel multiple of 1 or more (1: no rounding).")
    if method not in METHODS:
        raise ToolkitError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}.")
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        raise ToolkitError("toolkit prune needs Torch-Pruning: pip install 'toolkit[prune]' (PyPI torch-pruning).") from None
    say = progress or (lambda _msg: None)
    source = source_of(model, preset)
    say(f"building the PyTorch reference for {source.describe()} (twice: one stays unpruned for the task gate)")
    original, spec = resolve(source), resolve(source)
    before = pruned.attributes(spec.module)
    cost_before = _cost(spec)
    started = time.perf_counter()
    try:
        record = _prune_module(spec, amount, method, say, round_to)
    except ToolkitError:
        raise
    except Exception as exc:  # Torch-Pruning's tracing and its pruners raise many types
        raise ToolkitError(f"Torch-Pruning could not prune {source.describe()}: {type(exc).__name__}: {exc}. Its dependency graph follows "
                           "the autograd graph of one forward at the export sizes; a model it cannot trace is not pruned.") from exc
    record["seconds"] = round(time.perf_counter() - started, 3)
    if not record["removed"]:
        raise ToolkitError(f"nothing in {source.describe()} can be pruned: {_reasons(record['kept'])}.")
    if fine_tune and spec.fine_tune is not None:
        say("fine-tuning the pruned model with the model's training recipe")
        record["fine_tune"] = spec.fine_tune()
    else:
        record["fine_tune"] = None if fine_tune else "skipped (--no-fine-tune)"
        if fine_tune:
            say("no training recipe for this model (ModelSpec.fine_tune): pruned without fine-tuning; the gate reports the loss")
    cost_after = _cost(spec)
    record.update(amount=amount, method=method, round_to=round_to, params=[cost_before[1], cost_after[1]], macs=[cost_before[0], cost_after[0]])
    record["gate"] = _gate(original, spec, say)
    out = Path(out)
    with staged_directory(out, overwrite=force) as staging:
        pruned.save(spec.module, before, staging / pruned.FILE)
        pruned_source = dataclasses.replace(source, pruned=pruned.FILE, pruned_sha256=sha256_file(staging / pruned.FILE))
        _export_into(staging, pruned_source, name=name, static_cache=False, opset=DEFAULT_OPSET, exporter="auto",
                     verbose=False, isolate=True, say=say)
        bundle = Bundle.open(staging, trust_source=True)
        bundle.update(lambda manifest: setattr(manifest, "pruning", record))
    bundle = Bundle.open(out, trust_source=True)
    remember(bundle)  # the user named the model: from now on too, while it names the same code
    say("checking variant fp32 against the pruned PyTorch model, rebuilt from the bundle")
    check(bundle, variants=["fp32"], progress=say, trust_source=True)
    return Bundle.open(out, trust_source=True)


@contextlib.contextmanager
def _concat_of_inputs_tolerated() -> Iterator[None]:
    """Torch-Pruning 1.6 sums the channels of a concat's inputs before it checks them for None, and an
    input tensor (a KV cache concatenated with the new keys) has None: it raises TypeError where it
    means to leave that concat's index mapping alone, as it does a few lines later. Leave it alone."""
    from torch_pruning.dependency import index_mapping

    update = getattr(index_mapping, "update_concat_index_mapping", None)
    if update is None:  # a later Torch-Pruning, organised otherwise
        yield
        return

    def tolerant(graph: Any, node: Any) -> None:
        try:
            update(graph, node)
        except TypeError:
            return

    index_mapping.update_concat_index_mapping = tolerant
    try:
        yield
    finally:
        index_mapping.update_concat_index_mapping = update


@_concat_of_inputs_tolerated()
def _prune_module(spec: ModelSpec, amount: float, method: str, say: Progress, round_to: int = 1) -> dict[str, Any]:
    module = spec.module
    graphs = [spec, *spec.parts.values()]
    shapes = [_output_shapes(g) for g in graphs]
    sizes = {n: _size(m) for n, m in module.named_modules()}
    weights = {n: _own_shapes(m) for n, m in module.named_modules()}
    kept: dict[str, str] = {}
    with _conv1d_as_linear(module), warnings.catch_warnings():
        # weights outside the layers it knows (a norm's, a position table) are pruned along their last
        # axis, which the forward check confirms; the record below lists them with the rest
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected", category=UserWarning)
        removed_heads = _prune_graphs(module, graphs, shapes, amount, method, round_to, kept)
    module.zero_grad(set_to_none=True)
    module.eval()
    removed = {n: _shrunk(sizes[n], _size(m)) for n, m in module.named_modules() if n in sizes and _size(m) != sizes[n]}
    for name, layer in module.named_modules():
        now = _own_shapes(layer)
        if now != weights[name]:
            removed.setdefault(name, {"weights": [_shapes_text(weights[name]), _shapes_text(now)]})
        elif not isinstance(layer, _torch_module_types()) and not _is_conv1d(layer) and any(len(s) >= 2 for s in now):
            kept.setdefault(name, f"a {type(layer).__name__}: toolkit prunes nn.Linear, convolutions and nn.LSTM, "
                                  "and the layers their channels feed, not this layer type")
    for name, change in removed_heads.items():
        removed.setdefault(name, {}).update(change)
    say(f"pruned {len(removed)} modules; kept whole: {len(kept)}")
    return {"removed": removed, "kept": kept}


def _prune_graphs(module: Any, graphs: list[ModelSpec], shapes: list[list[tuple[int, ...]]], amount: float, method: str,
                  round_to: int, kept: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Prunes heads, then every graph's groups; returns the heads removed per attention module."""
    import torch
    import torch_pruning as tp

    names = {m: n for n, m in module.named_modules()}
    heads = _prunable_heads(module, graphs, names, kept)
    owners = _heads_owners(heads)
    if method == "taylor" and heads:  # to rank heads; the groups' gradients are taken again below
        _gradients(graphs)
    removed_heads = {}
    for attention, count in heads.items():
        drop = _least_important_heads(attention, count, amount, method)
        if drop:
            attention.prune_heads(drop)
            removed_heads[names[attention]] = {"heads": [count, count - len(drop)], "removed": drop}
    reached: set[Any] = set()
    for graph in graphs:
        traced = _dependency(module, graph)
        layers = [m for m in traced.dependency.module2node if isinstance(m, _root_types())]
        ignored = [m for m in layers if m in reached or m in owners or _keep_whole(traced, m, names, kept)]
        reached.update(layers)
        if method == "taylor":
            _gradients(graphs)
        ratios = _rounded_ratios(traced, [m for m in layers if m not in ignored], amount, round_to) if round_to > 1 else None
        pruner = tp.pruner.MetaPruner(
            module, _example_args(graph), _importance(method), pruning_ratio=amount, pruning_ratio_dict=ratios, ignored_layers=ignored,
            forward_fn=_forward(graph), customized_pruners={torch.nn.LSTM: _lstm_pruner()},
            root_module_types=list(_root_types()))
        for group in pruner.step(interactive=True):
            _prune_or_undo(group, module, graphs, shapes, names, kept)
    return removed_heads


def _is_conv1d(layer: Any) -> bool:
    """transformers' Conv1D (GPT-2's projections): a Linear with its weight stored transposed, (nx, nf)."""
    weight = getattr(layer, "weight", None)
    return type(layer).__name__ == "Conv1D" and isinstance(getattr(layer, "nf", None), int) and \
        getattr(weight, "shape", None) == (layer.nx, layer.nf)


@contextlib.contextmanager
def _conv1d_as_linear(module: Any) -> Iterator[None]:
    """Every transformers Conv1D stands in as the nn.Linear it computes while Torch-Pruning works
    (which knows Linear, not Conv1D), then goes back, with the pruned widths and weights: the model
    keeps its own classes, so the pruned structure applies to the model its source builds."""
    import torch

    swapped = []
    for name, layer in list(module.named_modules()):
        if _is_conv1d(layer):
            linear = torch.nn.Linear(layer.nx, layer.nf, bias=layer.bias is not None)
            linear.weight = torch.nn.Parameter(layer.weight.detach().t().contiguous())
            if layer.bias is not None:
                linear.bias = layer.bias
            parent, _, attribute = name.rpartition(".")
            owner = module.get_submodule(parent)
            setattr(owner, attribute, linear)
            swapped.append((owner, attribute, layer, linear))
    try:
        yield
    finally:
        for owner, attribute, layer, linear in swapped:
            layer.weight = torch.nn.Parameter(linear.weight.detach().t().contiguous())
            if linear.bias is not None:
                layer.bias = linear.bias
            layer.nf, layer.nx = linear.out_features, linear.in_features
            setattr(owner, attribute, layer)


def _rounded_ratios(traced: _Traced, roots: list[Any], amount: float, multiple: int) -> dict[Any, float]:
    """Per root layer, the pruning ratio that leaves a multiple of `multiple` channels: Torch-Pruning
    keeps int(channels × (1 - ratio)), so the ratio aims half a channel above the count wanted."""
    ratios = {}
    for layer in roots:
        pruner = traced.dependency.get_pruner_of_module(layer)
        channels = pruner.get_out_channels(layer) if pruner is not None else None
        if not channels:
            continue
        left = int(channels * (1 - amount)) // multiple * multiple
        ratios[layer] = 1 - (left + 0.5) / channels if 0 < left < channels else 0.0
    return ratios


def _prune_or_undo(group: Any, module: Any, graphs: list[ModelSpec], shapes: list[list[tuple[int, ...]]],
                   names: dict[Any, str], kept: dict[str, str]) -> None:
    """Prunes one group, then runs every graph: a model may use a width as a number Torch-Pruning
    cannot see (a positional table built from its config, a reshape to a configured size), and such
    a group is put back as it was and kept whole with the error that showed it."""
    saved = _Saved(module)
    group.prune()
    problem = _retie(saved.ties, names) or _breakage(graphs, shapes)
    if problem is not None:
        saved.restore()
        root = group[0][0].target.module
        kept[names.get(root, str(root))] = f"its output channels cannot be pruned: {problem}"


def _breakage(graphs: list[ModelSpec], shapes: list[list[tuple[int, ...]]]) -> str | None:
    """What running every graph at its export sizes shows wrong, if anything."""
    try:
        for graph, before in zip(graphs, shapes, strict=True):
            after = _output_shapes(graph)
            if after != before:
                changed = [f"{o} {b} → {a}" for o, b, a in zip(graph.outputs, before, after, strict=True) if a != b]
                return f"it changes the outputs ({', '.join(changed)})"
    except Exception as exc:  # the model's own forward, on shapes it was not written for
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        return f"the model's forward fails without them ({type(exc).__name__}: {first_line})"
    return None


class _Saved:
    """Every module's parameters, buffers and scalar attributes, by reference: Torch-Pruning replaces a
    pruned parameter with a new one and leaves the old one intact, so putting the old ones back undoes it."""

    def __init__(self, module: Any) -> None:
        self.modules = [(m, dict(m._parameters), dict(m._buffers), pruned.scalars(m)) for m in module.modules()]
        shared: dict[int, list[tuple[Any, str]]] = {}
        for m, parameters, _, _ in self.modules:
            for name, parameter in parameters.items():
                if parameter is not None:
                    shared.setdefault(id(parameter), []).append((m, name))
        self.ties = [places for places in shared.values() if len(places) > 1]

    def restore(self) -> None:
        import torch

        for m, parameters, buffers, scalars in self.modules:
            m._parameters.clear()
            m._parameters.update(parameters)
            m._buffers.clear()
            m._buffers.update(buffers)
            for key, value in scalars.items():
                setattr(m, key, value)
            if isinstance(m, torch.nn.LSTM):
                m._init_flat_weights()


def _retie(ties: list[list[tuple[Any, str]]], names: dict[Any, str]) -> str | None:
    """Torch-Pruning prunes a tied weight (an embedding shared with the LM head) once per module that
    holds it, into separate parameters with the same values: makes them one parameter again, or
    says which tie the group would break (one holder pruned and not the other)."""
    import torch

    for places in ties:
        first = getattr(*places[0])
        for m, name in places[1:]:
            other = getattr(m, name)
            if other is first:
                continue
            if other.shape != first.shape or not torch.equal(other, first):
                return f"it would untie the weights {names[places[0][0]]}.{places[0][1]} and {names[m]}.{name}, which the model shares"
            setattr(m, name, first)
    return None


def _reasons(kept: dict[str, str], shown: int = 4) -> str:
    """The layers kept whole, grouped by reason, a few names each."""
    if not kept:
        return "it has no Linear, convolution or LSTM layers"
    by_reason: dict[str, list[str]] = {}
    for name, reason in kept.items():
        by_reason.setdefault(reason, []).append(name)
    parts = []
    for reason, layers in by_reason.items():
        more = f" and {len(layers) - shown} more" if len(layers) > shown else ""
        parts.append(f"{', '.join(layers[:shown])}{more}: {reason}")
    return "; ".join(parts)


@dataclasses.dataclass
class _Traced:
    """Torch-Pruning's dependency graph of the model as one of its graphs (the model or a part) runs
    it, and the nodes that make that graph's outputs (a KV cache is an output that attention also reads)."""

    dependency: Any
    outputs: set[Any]

    def reaches_output(self, layer: Any) -> bool:
        """Whether pruning `layer`'s output channels would change the shape of a graph output."""
        pruner = self.dependency.get_pruner_of_module(layer)
        group = self.dependency.get_pruning_group(layer, pruner.prune_out_channels, [0])
        return any(dep.target in self.outputs and self.dependency.is_out_channel_pruning_fn(dep.handler) for dep, _ in group)


def _dependency(module: Any, graph: ModelSpec) -> _Traced:
    import torch
    import torch_pruning as tp

    results: list[Any] = []

    def forward(_model: Any, inputs: Any) -> Any:
        results.append(graph.module(*inputs))
        return results[-1]

    dependency = tp.DependencyGraph().build_dependency(module, example_inputs=_example_args(graph), forward_fn=forward,
                                                       customized_pruners={torch.nn.LSTM: _lstm_pruner()})
    made = {t.grad_fn for t in tp.utils.flatten_as_list(results[-1]) if getattr(t, "grad_fn", None) is not None}
    return _Traced(dependency, {node for node in dependency.module2node.values() if node.grad_fn in made})


def _heads_owners(heads: dict[Any, int]) -> set[Any]:
    """The Linear layers that attention modules' head hooks prune: Torch-Pruning leaves them alone."""
    owners = set()
    for attention in heads:
        parameters = {id(p) for p, _, _ in attention.head_parameters(0)}
        owners |= {m for m in attention.modules() if any(id(p) in parameters for p in m.parameters(recurse=False))}
    return owners


def _prunable_heads(module: Any, graphs: list[ModelSpec], names: dict[Any, str], kept: dict[str, str]) -> dict[Any, int]:
    """Attention modules with head hooks whose heads may go: every Linear they prune is reached by a
    graph and none of their outputs' channels reach a graph output (a KV cache keeps its heads)."""

    candidates = [m for m in module.modules() if callable(getattr(m, "prune_heads", None)) and callable(getattr(m, "head_parameters", None))]
    if not candidates:
        return {}
    dependencies = [_dependency(module, g) for g in graphs]
    heads = {}
    for attention in candidates:
        count = int(attention.heads)
        owners = _heads_owners({attention: count})
        reaching = [names[m] for m in owners for d in dependencies if m in d.dependency.module2node and d.reaches_output(m)]
        if reaching:
            kept[names[attention]] = f"heads kept: {', '.join(sorted(set(reaching)))} reaches a graph output (a KV cache)"
        elif not all(any(m in d.dependency.module2node for d in dependencies) for m in owners):
            kept[names[attention]] = "heads kept: part of it is not reached by any graph of the model"
        elif count < 2:
            kept[names[attention]] = "heads kept: it has one head"
        else:
            heads[attention] = count
    return heads


def _keep_whole(traced: _Traced, layer: Any, names: dict[Any, str], kept: dict[str, str]) -> bool:
    """Whether the group rooted at `layer`'s outputs must stay whole, recording why."""
    import torch

    if isinstance(layer, torch.nn.LSTM) and (layer.bidirectional or layer.proj_size):
        kept[names[layer]] = "a bidirectional or projected LSTM: toolkit prunes the hidden units of plain LSTMs only"
        return True
    dependency = traced.dependency
    pruner = dependency.get_pruner_of_module(layer)
    if pruner is None or pruner.get_out_channels(layer) is None:
        return True
    if _feeds_activation_product(dependency.module2node[layer]):
        kept[names[layer]] = _THROUGH_ATTENTION
        return True
    if traced.reaches_output(layer):
        kept[names[layer]] = "its output channels reach a graph output"
        return True
    group = dependency.get_pruning_group(layer, pruner.prune_out_channels, [0])
    if any(_activation_product(dep.target) for dep, _ in group):
        kept[names[layer]] = _THROUGH_ATTENTION
        return True
    return False


_THROUGH_ATTENTION = "its output channels pass through a product of two activations (attention), which Torch-Pruning cannot follow"


def _feeds_activation_product(node: Any) -> bool:
    """Whether `node`'s output reaches a product of two activations before any layer re-mixes its
    channels. Checked before Torch-Pruning builds the layer's group: through attention with rotary
    embeddings and grouped heads that group grows for minutes."""
    seen, frontier = {id(node)}, list(node.outputs)
    while frontier:
        current = frontier.pop()
        if id(current) in seen or isinstance(current.module, _torch_module_types()):
            continue
        seen.add(id(current))
        if _activation_product(current):
            return True
        frontier.extend(current.outputs)
    return False


def _activation_product(node: Any) -> bool:
    """A matrix product of two activations (not a layer's product with its weight, which a Linear over
    a 3-D input shows as a separate Mm node)."""
    grad_fn = getattr(node, "grad_fn", None)
    if node.module is None or isinstance(node.module, _torch_module_types()) or \
            type(grad_fn).__name__ not in ("BmmBackward0", "MmBackward0", "MatMulBackward0"):
        return False
    return not any(_from_parameter(fn) for fn, _ in grad_fn.next_functions if fn is not None)


def _from_parameter(fn: Any, depth: int = 4) -> bool:
    """Whether an operand comes from a parameter through views and transposes only."""
    if type(fn).__name__ == "AccumulateGrad":
        return True
    inputs = [f for f, _ in getattr(fn, "next_functions", ()) if f is not None]
    return depth > 0 and len(inputs) == 1 and _from_parameter(inputs[0], depth - 1)


def _root_types() -> tuple[type, ...]:
    """The layers whose output channels root a pruning group."""
    import torch

    return (torch.nn.Linear, torch.nn.modules.conv._ConvNd, torch.nn.LSTM)


def _torch_module_types() -> tuple[type, ...]:
    import torch

    return (*_root_types(), torch.nn.Embedding)


def _least_important_heads(attention: Any, count: int, amount: float, method: str) -> list[int]:
    drop = min(int(count * amount), count - 1)
    if not drop:
        return []
    scores = []
    for head in range(count):
        total = 0.0
        for parameter, axis, index in attention.head_parameters(head):
            weight = parameter.detach().index_select(axis, index)
            if method == "taylor" and parameter.grad is not None:
                weight = weight * parameter.grad.index_select(axis, index)
            total += float(weight.abs().sum())
        scores.append(total)
    return sorted(np.argsort(scores, kind="stable")[:drop].tolist())


def _importance(method: str) -> Any:
    import torch_pruning as tp

    return tp.importance.MagnitudeImportance(p=1) if method == "l1" else tp.importance.GroupTaylorImportance()


def _gradients(graphs: list[ModelSpec]) -> None:
    """Gradients for Taylor importance, summed over the model's graphs: each graph's loss against its
    own predictions (classes or next tokens) or the energy of its output, on up to 64 of its held-out inputs."""
    import torch
    import torch.nn.functional as F

    graphs[0].module.zero_grad(set_to_none=True)
    for graph in graphs:
        feeds = _inputs(graph)
        with torch.enable_grad():
            output = graph.module(*(torch.from_numpy(feeds[t.name]) for t in graph.inputs))
            output = output[0] if isinstance(output, (tuple, list)) else output
            if graph.task in ("classify", "generate"):
                logits = output.reshape(-1, output.shape[-1])
                loss = F.cross_entropy(logits, logits.detach().argmax(-1))
            else:
                loss = output.pow(2).mean()
            loss.backward()


def _inputs(spec: ModelSpec) -> dict[str, np.ndarray]:
    from toolkit.runtime.samples import make_feeds

    if spec.eval_data is not None:
        feeds = spec.eval_data()[0]
    elif spec.sample_data is not None:
        feeds = spec.sample_data()
    else:
        feeds = make_feeds(spec.inputs, {d.name: (_TAYLOR_ROWS if d.name == "batch" else d.export) for d in spec.dims}, 0)
    batched = {t.name for t in spec.inputs if t.shape and t.shape[0] == "batch"}
    return {k: v[:_TAYLOR_ROWS] if k in batched else v for k, v in feeds.items()}


def _forward(graph: ModelSpec) -> Callable[[Any, Any], Any]:
    def forward(_model: Any, inputs: Any) -> Any:
        return graph.module(*inputs)

    return forward


def _output_shapes(graph: ModelSpec) -> list[tuple[int, ...]]:
    import torch

    with torch.inference_mode():
        result = graph.module(*_example_args(graph))
    return [tuple(t.shape) for t in (result if isinstance(result, (tuple, list)) else (result,))]


def _size(module: Any) -> dict[str, int]:
    """The widths a structured pruning changes, as the module states them."""
    keys = ("in_features", "out_features", "in_channels", "out_channels", "hidden_size", "input_size", "num_features",
            "normalized_shape", "embedding_dim", "embed_dim", "num_channels", "num_parameters", "nf", "nx")
    found = {}
    for key in keys:
        value = getattr(module, key, None)
        if isinstance(value, int):
            found[key] = value
        elif isinstance(value, tuple) and len(value) == 1:
            found[key] = value[0]
    return found


def _own_shapes(module: Any) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in module.parameters(recurse=False)]


def _shapes_text(shapes: list[tuple[int, ...]]) -> str:
    return ", ".join("×".join(map(str, shape)) for shape in shapes)


def _shrunk(before: dict[str, int], after: dict[str, int]) -> dict[str, list[int]]:
    return {key: [before[key], after[key]] for key in before if after.get(key) != before[key]}


def _cost(spec: ModelSpec) -> tuple[int, int]:
    """(MACs, parameters) of one forward at the export sizes, as Torch-Pruning counts them."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(spec.module, _example_args(spec))
    return int(macs), int(params)


def _gate(original: ModelSpec, pruned_spec: ModelSpec, say: Progress) -> dict[str, Any]:
    """The pruned model against the unpruned one on the held-out inputs (each model on its own: a
    part such as an encoder feeds each its own outputs), by tolerance profile `pruned`."""
    tolerance = profile("pruned")
    say("judging the pruned model against the unpruned one on held-out inputs")
    reference = heldout_of(original, original.dims)
    mine = heldout_of(pruned_spec, pruned_spec.dims)
    gate = {"tolerance": tolerance.to_json(), "task_metric": judge_task(original.task, tolerance, reference, mine[2])}
    if original.eval_data is not None and original.task == "classify":
        _, labels, unpruned = reference_accuracy(original)
        accuracy = reference_accuracy(pruned_spec)[2]
        gate["accuracy"] = {"dataset": f"eval set, {len(labels)} rows", "unpruned": unpruned, "pruned": accuracy,
                            "drop": unpruned - accuracy, "passed": unpruned - accuracy <= tolerance.max_accuracy_drop}
    # With labels, the labels are the task: agreeing with the unpruned model's mistakes is not required.
    gate["passed"] = gate["accuracy"]["passed"] if "accuracy" in gate else gate["task_metric"]["passed"]
    return gate


def _lstm_pruner() -> Any:
    """Hidden units of an nn.LSTM, all layers at once (an nn.LSTM has one hidden size): the units'
    rows of every gate's input and recurrent weights and biases, their columns of the recurrent
    weights, and of the next layer's input weights."""
    import torch_pruning as tp

    class Pruner(tp.pruner.function.BasePruningFunc):
        TARGET_MODULES = ()

        def prune_out_channels(self, layer: Any, idxs: list[int]) -> Any:
            keep = _kept(layer.hidden_size, idxs)
            gates = _gate_rows(keep, layer.hidden_size)
            for index in range(layer.num_layers):
                tail = f"_l{index}"
                _take(layer, "weight_hh" + tail, gates, keep)
                _take(layer, "weight_ih" + tail, gates, keep if index else None)
                if layer.bias:
                    _take(layer, "bias_ih" + tail, gates, None)
                    _take(layer, "bias_hh" + tail, gates, None)
            layer.hidden_size = len(keep)
            layer._init_flat_weights()
            return layer

        def prune_in_channels(self, layer: Any, idxs: list[int]) -> Any:
            keep = _kept(layer.input_size, idxs)
            _take(layer, "weight_ih_l0", None, keep)
            layer.input_size = len(keep)
            layer._init_flat_weights()
            return layer

        def get_out_channels(self, layer: Any) -> int:
            return layer.hidden_size

        def get_in_channels(self, layer: Any) -> int:
            return layer.input_size

    return Pruner()


def _kept(size: int, drop: list[int]) -> list[int]:
    dropped = set(int(i) for i in drop)
    return [i for i in range(size) if i not in dropped]


def _gate_rows(keep: list[int], hidden: int) -> list[int]:
    return [g * hidden + i for g in range(4) for i in keep]


def _take(layer: Any, name: str, rows: list[int] | None, columns: list[int] | None) -> None:
    import torch

    tensor = getattr(layer, name).detach()
    if rows is not None:
        tensor = tensor[torch.tensor(rows)]
    if columns is not None:
        tensor = tensor[:, torch.tensor(columns)]
    setattr(layer, name, torch.nn.Parameter(tensor.clone()))

