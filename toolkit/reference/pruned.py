"""A pruned model's structure as data: what `toolkit prune` stores in a bundle, and how a rebuilt
reference gets it back.

A pruned module is its source's module with smaller tensors and a few integer attributes changed
(`out_features`, `hidden_size`, a head count). The bundle keeps exactly that, never a pickled
module: the weights and buffers of the pruned model (tensors, loaded with `weights_only`) and, per
module path, the attributes that differ from the unpruned model. Rebuilding the reference builds the
source's model as usual, then puts those tensors and attributes in place (`apply`), so parity,
quantization and repair run against the pruned model like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError

__all__ = ["FILE", "apply", "attributes", "load", "save", "scalars"]

FILE = "pruned.pt"
_FORMAT = 1
_SCALARS = (int, float, bool, str)


def attributes(module: Any) -> dict[str, dict[str, Any]]:
    """Per module path, its public scalar attributes (and tuples of them): what structure is made of."""
    return {path: scalars(child) for path, child in module.named_modules()}


def scalars(module: Any) -> dict[str, Any]:
    """One module's public scalar attributes (and tuples of them), not its children's."""
    return {name: value for name, value in vars(module).items()
            if not name.startswith("_") and (isinstance(value, _SCALARS) or
                                             (isinstance(value, tuple) and all(isinstance(v, _SCALARS) for v in value)))}


def save(module: Any, before: dict[str, dict[str, Any]], path: Path) -> None:
    """Writes `module`'s structure, as changed since `before` (`attributes` of the unpruned module), to `path`."""
    import torch

    now = attributes(module)
    changed = {p: {k: v for k, v in attrs.items() if before.get(p, {}).get(k, v) != v} for p, attrs in now.items()}
    torch.save({"format": _FORMAT, "attributes": {p: a for p, a in changed.items() if a},
                "state": {k: v.detach().clone() for k, v in module.state_dict(keep_vars=False).items()}}, path)


def load(path: Path, sha256: str | None) -> dict[str, Any]:
    """The structure saved at `path`, refused unless its sha256 is the one the manifest records."""
    import torch

    from toolkit.bundle import sha256_file

    if not path.is_file():
        raise ToolkitError(f"the pruned structure {path} is missing: the bundle is incomplete; prune the model again.")
    if sha256 is None or sha256_file(path) != sha256:
        raise ToolkitError(f"{path} is not the pruned structure the manifest records (sha256 differs): the bundle was altered "
                           "after it was written; prune the model again.")
    saved = torch.load(path, weights_only=True)
    if saved.get("format") != _FORMAT:
        raise ToolkitError(f"{path} has pruned-structure format {saved.get('format')!r}; this toolkit reads format {_FORMAT}.")
    return saved


def apply(module: Any, saved: dict[str, Any]) -> None:
    """Gives the freshly built, unpruned `module` the pruned structure `saved`: its attributes, then
    every parameter and buffer at its pruned shape. Parameters the model ties (an LM head sharing the
    embedding's matrix) stay tied."""
    import torch

    modules = dict(module.named_modules())
    for path, attrs in saved["attributes"].items():
        if path not in modules:
            raise ToolkitError(f"the pruned structure names module {path!r}, which the model does not have: its source changed.")
        for name, value in attrs.items():
            setattr(modules[path], name, value)
    state = saved["state"]
    shared: dict[int, torch.nn.Parameter] = {}
    for full_name, tensor in list(module.named_parameters(remove_duplicate=False)):
        owner, name = _owner(modules, full_name)
        if full_name not in state:
            raise ToolkitError(f"the pruned structure has no tensor {full_name!r}: the model's source changed.")
        if id(tensor) not in shared:
            shared[id(tensor)] = torch.nn.Parameter(state[full_name].clone(), requires_grad=tensor.requires_grad)
        setattr(owner, name, shared[id(tensor)])
    for full_name, _ in list(module.named_buffers()):
        owner, name = _owner(modules, full_name)
        if full_name in state:
            owner._buffers[name] = state[full_name].clone()
    for child in module.modules():
        if isinstance(child, torch.nn.RNNBase):
            child._init_flat_weights()  # its fused-kernel view of the weights, rebuilt from the new tensors


def _owner(modules: dict[str, Any], full_name: str) -> tuple[Any, str]:
    path, _, name = full_name.rpartition(".")
    return modules[path], name
