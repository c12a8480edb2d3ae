"""Turns a MODEL reference into a `Source` and a `Source` into a `ModelSpec`: a zoo name (with a
preset), `package.module:factory`, or `hf:PATH`.

The factory convention for user models: a callable taking no arguments that returns a
`toolkit.ModelSpec` (module, inputs with dtypes and shapes naming their dynamic dims, output names,
dims with export and check sizes, task). See README, "Your own model".
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from toolkit._scoped import logging_disabled
from toolkit.bundle import Bundle, Source
from toolkit.errors import ToolkitError
from toolkit.spec import ModelSpec

__all__ = ["bundle_reference", "refuse_untrusted", "reference_models", "resolve", "source_of", "weights_sha256"]


def source_of(model: str, preset: str | None, *, trust_remote_code: bool = False) -> Source:
    """Where `model` (a zoo name, package.module:factory, hf:PATH or hf:org/name[@revision]) comes
    from; `resolve` rebuilds it. A hub id resolves to its snapshot in the Hugging Face cache
    (toolkit.reference.hub). `trust_remote_code` lets a Hugging Face model run its own code."""
    from toolkit.reference.hf import PREFIX

    if trust_remote_code and not model.startswith(PREFIX):
        raise ToolkitError(f"--trust-remote-code applies to Hugging Face models (hf:...), not {model!r}.")
    if model.startswith(PREFIX):
        if preset is not None:
            raise ToolkitError(f"--preset applies to zoo models only; {model!r} is a Hugging Face model.")
        spec = model[len(PREFIX):]
        path = Path(spec).expanduser()
        remote = {"remote_code": True} if trust_remote_code else {}
        if (path / "config.json").is_file():
            return Source("hf", path=str(path.resolve()), **remote)
        if path.exists() or spec.startswith((".", "/", "~")):
            what = "has no config.json" if path.exists() else "does not exist"
            raise ToolkitError(f"{model}: {path} {what}; give the directory of a saved transformers model (hf:PATH) or a hub id "
                               "(hf:org/name[@revision]).")
        from toolkit.reference.hub import hub_snapshot

        snapshot, repo, commit = hub_snapshot(spec)
        return Source("hf", path=str(snapshot), hub=repo, revision=commit, **remote)
    if ":" in model:
        if preset is not None:
            raise ToolkitError(f"--preset applies to zoo models only; {model!r} is a factory reference.")
        return Source("factory", ref=model)
    return Source("zoo", model=model, preset=preset or "default")


def resolve(source: Source, root: Path | None = None) -> ModelSpec:
    """The `ModelSpec` (PyTorch module in eval mode, inputs, dims, ...) that `source` names; a pruned
    source gets its structure from the file it names in `root`, the bundle's directory. What
    the model's libraries log at INFO and below while it is built is dropped, for check and build
    as for export (whose worker's output is shown only on failure)."""
    with logging_disabled(logging.INFO):
        if source.kind == "zoo":
            spec = _zoo(source.model, source.preset)
        elif source.kind == "hf":
            from toolkit.reference.hf import hf_spec

            spec = hf_spec(source.path, trust_remote_code=bool(source.remote_code))
        else:
            spec = _factory(source.ref)
    if source.pruned is not None:
        from toolkit.reference import pruned

        if root is None:
            raise ToolkitError(f"{source.describe()}: a pruned model is rebuilt from the bundle that holds its structure.")
        pruned.apply(spec.module, pruned.load(Path(root) / source.pruned, source.pruned_sha256))
        if spec.fusion:  # the config's head count and width no longer hold: the fusions read them off the graph
            spec.fusion = {**spec.fusion, "num_heads": 0, "hidden_size": 0}
    if source.part is not None:
        if source.part not in spec.parts:
            raise ToolkitError(f"{source.with_part(None).describe()} has no part {source.part!r}; "
                               f"its parts: {', '.join(spec.parts) or 'none'}.")
        spec = spec.parts[source.part]
    spec.module.eval()
    return spec


def bundle_reference(bundle: Bundle) -> ModelSpec:
    """The PyTorch reference of `bundle`, rebuilt from its manifest's source. A bundle is data that
    anyone may have written, so code it names (a factory, a Hugging Face directory) is run only when
    the user vouched for it: they named the model themselves (`toolkit build MODEL`, remembered:
    toolkit.bundle.trust), ran `toolkit trust DIR`, or passed --trust-source (`trust_source=True`);
    a zoo model is toolkit's own code."""
    refuse_untrusted(bundle)
    return resolve(bundle.manifest.source, bundle.path)


def refuse_untrusted(bundle: Bundle) -> None:
    """Raises, saying why and what to pass, when rebuilding `bundle`'s reference would run code that
    the user has not vouched for (see `bundle_reference`)."""
    from toolkit.bundle.trust import trusted

    source = bundle.manifest.source
    if source.kind != "zoo" and not bundle.trusted_source and not trusted(bundle):
        doing = "imports and calls that code" if source.kind == "factory" else "loads that directory with transformers"
        raise ToolkitError(
            f"bundle {bundle.path} names its PyTorch reference {source.describe()}; rebuilding it {doing}, as named by whoever "
            f"wrote the manifest. If you trust this bundle's source, run `toolkit trust {bundle.path}` (remembered while the bundle "
            "names the same, unchanged code), or pass --trust-source for this command (Python: trust_source=True). "
            "(load, run, serve, inspect and package never rebuild the reference.)"
        )


def _zoo(name: str, preset: str) -> ModelSpec:
    models = reference_models()
    try:
        return models.build(name, preset)
    except KeyError as exc:
        hint = " For your own model pass package.module:factory." if name not in models.FAMILIES else ""
        raise ToolkitError(f"{exc.args[0]}.{hint}") from None


def _factory(ref: str) -> ModelSpec:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ToolkitError(f"model reference {ref!r} must look like package.module:factory.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ToolkitError(
            f"cannot import {module_name!r} for model {ref!r}: {exc}. Is it installed or on PYTHONPATH?"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ToolkitError(f"{module_name} has no callable {attr!r} (from model reference {ref!r}).")
    try:
        spec = factory()
    except ToolkitError:
        raise
    except Exception as exc:
        raise ToolkitError(f"factory {ref} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(spec, ModelSpec):
        raise ToolkitError(
            f"factory {ref} returned {type(spec).__name__}; it must return a toolkit.ModelSpec "
            "(module, inputs, outputs, dims, task)."
        )
    import torch

    if not isinstance(spec.module, torch.nn.Module):
        raise ToolkitError(f"factory {ref}: ModelSpec.module is {type(spec.module).__name__}, not a torch.nn.Module.")
    return spec


def reference_models() -> ModuleType:
    """The `models` package installed beside `toolkit`, whatever else `models` means on sys.path.

    onnxruntime.transformers appends its own directory, which holds a `models` folder, to sys.path,
    and many projects have a `models/` of their own; a plain `import models` can find either.
    """
    init = Path(__file__).resolve().parents[2] / "models" / "__init__.py"
    loaded = sys.modules.get("models")
    loaded_file = getattr(loaded, "__file__", None)
    if loaded_file is not None and Path(loaded_file).resolve() == init:
        return loaded
    if loaded_file is not None:
        raise ToolkitError(
            f"another package named 'models' ({loaded_file}) is already imported and shadows toolkit's "
            "reference models; import toolkit's zoo before it or rename yours."
        )
    if not init.is_file():
        raise ToolkitError(f"toolkit's reference models are missing ({init} not found); reinstall toolkit.")
    spec = importlib.util.spec_from_file_location("models", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["models"] = module  # absent, or a namespace package that only looked like ours
    spec.loader.exec_module(module)
    return module


def weights_sha256(module: Any) -> str:
    """A fingerprint of the module's parameters and buffers, to tell a changed reference apart."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
