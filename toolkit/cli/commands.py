"""The `toolkit` command line: a thin Typer layer over the library's stages."""

from __future__ import annotations

import functools
import json
import os
import traceback
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from toolkit import __version__
from toolkit.cli import render
from toolkit.compile.exporter import DEFAULT_OPSET, EXPORTERS
from toolkit.compile.prune import METHODS as PRUNE_METHODS
from toolkit.compile.quantization.configs import CALIBRATION_METHODS, FP16_IO, INT4_ALGOS, INT4_HEADS, MODES, ROUNDINGS
from toolkit.errors import EXIT_CHECK_FAILED, ToolkitError
from toolkit.runtime.generate import CACHES
from toolkit.runtime.session import PROVIDERS

app = typer.Typer(
    help="Export PyTorch models to ONNX bundles, check their parity, inspect and run them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Markup off: messages carry shapes like [batch, 784] that rich would take for tags; styles are
# applied with Text instead.
out = Console(markup=False, highlight=False, soft_wrap=True)
err = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)
_PIPE_WIDTH = 200


def _choices(name: str, values: Sequence[str]) -> type[Enum]:
    """A Typer choice type whose values are the library's own (so the two never drift apart)."""
    return Enum(name, {v.replace("-", "_"): v for v in values}, type=str)


Exporter = _choices("Exporter", EXPORTERS)
Provider = _choices("Provider", ("auto", *PROVIDERS))
Backend = _choices("Backend", ("native", "ray"))
Mode = _choices("Mode", MODES)
Method = _choices("Method", CALIBRATION_METHODS)
Rounding = _choices("Rounding", ROUNDINGS)
Fp16Io = _choices("Fp16Io", FP16_IO)
Int4Algo = _choices("Int4Algo", INT4_ALGOS)
Int4Head = _choices("Int4Head", INT4_HEADS)
Cache = _choices("Cache", CACHES)
PruneMethod = _choices("PruneMethod", PRUNE_METHODS)


# What export and build both take.
ModelArgument = Annotated[str, typer.Argument(metavar="MODEL", help="A reference model (see `toolkit models`), package.module:factory, hf:PATH (a local transformers model) or hf:org/name, hf:org/name@revision (a hub id, through the Hugging Face cache).")]
OutOption = Annotated[Path, typer.Option("-o", "--out", help="Bundle directory to create.")]
PresetOption = Annotated[str | None, typer.Option(help="Preset of a reference model (default: 'default').")]
TrustSourceOption = Annotated[bool, typer.Option(
    "--trust-source", help="Rebuild the PyTorch reference even when the manifest names a factory or a Hugging Face directory: that "
    "imports and runs the code the bundle's author named. Without it only zoo models are rebuilt.")]
TrustRemoteCodeOption = Annotated[bool, typer.Option(
    "--trust-remote-code", help="A Hugging Face model that runs its own code (config.json's auto_map): let transformers import it "
    "from the model's directory. Recorded in the bundle's source.")]
KeyOption = Annotated[Path | None, typer.Option(
    "--key", metavar="KEY", envvar="TOOLKIT_BUNDLE_KEY", show_envvar=True,
    help="An encrypted bundle's key (`toolkit encrypt`): the X25519 or RSA private key (PEM) or the key file it was sealed for; "
    "its files are decrypted in memory only.")]
NameOption = Annotated[str | None, typer.Option(help="Bundle name (in serving URLs and Triton repositories; default: from the model, e.g. the zoo name or the factory's module).")]

# --debug, set by the group's callback for the command it runs (a ContextVar: CliRunner and threads
# keep their own).
_DEBUG: ContextVar[bool] = ContextVar("toolkit_debug", default=False)


def _version(value: bool) -> None:
    if value:
        out.print(f"toolkit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and the exporters' own output."),
    version: bool | None = typer.Option(None, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _DEBUG.set(debug)
    _fit_width()


def _fit_width() -> None:
    """Tables as wide as COLUMNS says when it is set, read at each invocation (rich reads it once, when
    the console is made); written to a pipe or a file, rows are not wrapped to 80 columns."""
    columns = os.environ.get("COLUMNS", "")
    for console in (out, err):
        if columns.isdigit():
            console.width = int(columns)
        elif not console.is_terminal:
            console.width = _PIPE_WIDTH


def _debug() -> bool:
    return _DEBUG.get()


def _user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turns ToolkitError into `error: ...` on stderr and its exit code; --debug adds the traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ToolkitError as exc:
            if _debug():
                traceback.print_exc()
                if getattr(exc, "worker_traceback", None):
                    err.print(f"in the export worker:\n{exc.worker_traceback}")
            err.print(Text("error: ", style="bold red") + Text(str(exc)))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted: nothing was written.")
            raise typer.Exit(130) from None

    return wrapper


def _command(function: Callable[..., Any]) -> Callable[..., Any]:
    """A CLI command whose ToolkitErrors become messages and exit codes."""
    return app.command()(_user_errors(function))


def _progress(message: str) -> None:
    err.print(Text("• ", style="dim") + Text(message))


@_command
def models() -> None:
    """List the reference models and their presets."""
    import dataclasses

    from toolkit.reference.source import reference_models

    zoo = reference_models()

    table = Table("model", "task", "presets", "description")
    for family in zoo.families():
        presets = family.presets()
        default = dataclasses.asdict(presets["default"])
        lines = []
        for name, config in presets.items():
            changed = {k: v for k, v in dataclasses.asdict(config).items() if v != default[k]}
            lines.append(name + (" (" + ", ".join(f"{k}={v}" for k, v in changed.items()) + ")" if changed else ""))
        table.add_row(family.name, family.task, "\n".join(lines), family.summary)
    out.print(table)
    out.print("Your own model: toolkit export package.module:factory (see README, 'Your own model').")


@_command
def export(
    model: ModelArgument,
    out_dir: OutOption,
    preset: PresetOption = None,
    name: NameOption = None,
    static_cache: bool = typer.Option(False, "--static-cache", help="Decoders: also export the decoder over a cache preallocated to the context (part `static`), which CUDA graphs replay."),
    opset: int = typer.Option(DEFAULT_OPSET, help="ONNX opset to export to."),
    exporter: Exporter = typer.Option(Exporter.auto, help="auto tries dynamo (torch.export) and falls back to torchscript, saying so."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out."),
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Export a PyTorch model to a new bundle (manifest.json + the fp32 ONNX model), written atomically.
    MODEL is a zoo name, package.module:factory, hf:PATH (a saved transformers model) or
    hf:org/name or hf:org/name@revision (through the Hugging Face cache; offline with HF_HUB_OFFLINE=1)."""
    from toolkit.compile.exporter import export as export_model

    bundle = export_model(
        model, out_dir, preset=preset, name=name, static_cache=static_cache, opset=opset, exporter=exporter.value, force=force, progress=_progress,
        verbose=_debug(), trust_remote_code=trust_remote_code,
    )
    out.print(f"exported {bundle.manifest.name} to {bundle.path}; next: toolkit check {bundle.path}")


@_command
def check(
    bundle_dir: Path = typer.Argument(..., metavar="DIR", help="Bundle directory."),
    variant: list[str] | None = typer.Option(None, "--variant", help="Variant to check (repeatable; default: all)."),
    provider: Provider = typer.Option(Provider.cpu, help="Execution provider the variants run on."),
    json_file: Path | None = typer.Option(None, "--json", help="Also write the report as JSON to this file ('-' for stdout)."),
    localize: bool = typer.Option(False, "--localize", help="For each variant that fails: run it beside fp32 on held-out inputs and name where its error leaves the tolerance and where it grows most (tensor, op, PyTorch module, value range)."),
    bisect: bool = typer.Option(False, "--bisect", help="With --localize: expose one intermediate tensor per run in a binary search (⌈log2 N⌉+2 runs), for models whose intermediate tensors do not fit in memory at once."),
    trust_source: TrustSourceOption = False,
) -> None:
    """Check every variant's parity against the PyTorch reference; exit 1 if any fails.

    Several seeds, two sizes of every dynamic dim, per-output max abs and relative error against the
    precision's tolerance profile, and accuracy for classifiers with a labelled eval set. The
    results are stored in the manifest.
    """
    from toolkit.compile.localize import localize as localize_variant
    from toolkit.compile.parity import check as check_bundle

    if bisect and not localize:
        raise ToolkitError("--bisect is a way of localizing: give it with --localize.")
    records = check_bundle(bundle_dir, variants=variant, provider=provider.value, progress=_progress, trust_source=trust_source)
    passed = all(r["passed"] for r in records.values())
    failing = [name for name, record in records.items() if not record["passed"] and name != "fp32"] if localize else []
    localized = {name: localize_variant(bundle_dir, name, provider=provider.value, mode="bisect" if bisect else "all", progress=_progress,
                                        trust_source=trust_source)
                 for name in failing}
    console = err if str(json_file) == "-" else out
    if json_file is not None:
        report = json.dumps({"bundle": str(bundle_dir), "passed": passed, "variants": records,
                             **({"localize": {name: loc.to_json() for name, loc in localized.items()}} if localize else {})}, indent=2)
        if str(json_file) == "-":
            print(report)
        else:
            json_file.write_text(report + "\n")
    render.parity_table(console, records, f"parity: {bundle_dir}")
    for loc in localized.values():
        render.localization_table(console, loc)
    if localize and not failing:
        console.print("--localize: every checked variant passed (or only fp32 failed, which is the reference graph): nothing to localize")
    if not passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


@_command
def optimize(
    bundle_dir: Path = typer.Argument(..., metavar="DIR", help="Bundle directory."),
    provider: Provider = typer.Option(Provider.cpu, help="Execution provider the variant is made for (auto: CUDA where available). "
                                      "For the CPU, SkipLayerNormalization is split into Add + LayerNormalization, which run faster there."),
    check_parity: bool = typer.Option(True, "--check/--no-check", help="Check the new variant's parity right away."),
    trust_source: TrustSourceOption = False,
) -> None:
    """Add variant `opt`: transformer fusions (encoder, gpt, or hinted user models) and onnxruntime's
    basic graph optimizations, saved offline. Exit 1 if its parity check fails."""
    from toolkit.compile.optimizer import optimize as optimize_bundle

    if check_parity:
        _reference_allowed(bundle_dir, trust_source)
    optimize_bundle(bundle_dir, provider=_made_for(provider), progress=_progress)
    _check_new(bundle_dir, "opt", check_parity, trust_source=trust_source)


def _made_for(provider: Provider) -> str:
    """The provider a variant is made for: auto is CUDA where it is available here."""
    if provider != Provider.auto:
        return provider.value
    from toolkit.bench.compare import available_providers

    return "cuda" if "cuda" in available_providers() else "cpu"


@_command
def quantize(
    bundle_dir: Path = typer.Argument(..., metavar="DIR", help="Bundle directory."),
    mode: Mode = typer.Option(..., help="int8: dynamic (weights int8, activations per call); int8-static: QDQ with calibration; fp16: half precision; "
                              "int4: MatMul weights in int4 blocks (MatMulNBits), for transformers."),
    calibration_samples: int | None = typer.Option(None, help="int8, int8-static, int4 --algo gptq: samples from the model's calibration set (or sample inputs) (default: 128; gptq 32)."),
    method: Method | None = typer.Option(None, help="int8-static: calibration method (default: minmax)."),
    rounding: Rounding | None = typer.Option(None, help="int8-static: gptq rounds each weight for its layer's output on calibration inputs (each column's rounding error carried into the next), nearest to its nearest level (default: gptq)."),
    per_channel: bool | None = typer.Option(None, "--per-channel/--per-tensor", help="int8, int8-static: weight scales per output channel or per tensor (default: per channel)."),
    keep_float: int | None = typer.Option(None, help="int8: keep this many MatMul/Gemm in fp32, those with the most outlier-heavy inputs on calibration data (default: 0)."),
    smooth: bool | None = typer.Option(None, "--smooth/--no-smooth", help="int8, int8-static: move activation outliers into the weights (SmoothQuant) where that lowers the int8 error on calibration data (default: smooth)."),
    reduce_range: bool | None = typer.Option(None, "--reduce-range/--full-range", help="int8, int8-static: 7-bit weights, which x86 CPUs without VNNI need (their uint8 × int8 sums saturate) (default: on such a CPU)."),
    keep_fp32: str | None = typer.Option(None, help="fp16: comma-separated op types kept in fp32 (default: LayerNormalization, Softmax, reductions, Pow, Exp); '' keeps none."),
    io: Fp16Io | None = typer.Option(None, help="fp16: fp32 keeps the graph's float inputs and outputs in fp32; fp16 makes them fp16 too (a decoder's cache stays fp16; for CUDA) (default: fp32)."),
    block_size: int | None = typer.Option(None, "--block-size", help="int4: input rows per block sharing a scale, a power of two >= 16 (default: 32)."),
    algo: Int4Algo | None = typer.Option(None, help="int4: rtn rounds to nearest, hqq fits scales to the weights, gptq corrects rounding errors on calibration inputs (default: rtn)."),
    accuracy_level: int | None = typer.Option(None, "--accuracy-level", help="int4: MatMulNBits' compute type: 4 int8 activations (fastest on CPUs), 0 the provider's choice, 1 fp32 (default: 4)."),
    head: Int4Head | None = typer.Option(None, help="int4: how the MatMuls that make a graph output (a language model's head) are stored: int8 blocks (a quarter of float's bytes), int4 like the rest, or float (default: int8)."),
    source: str = typer.Option("fp32", help="The fp32-precision variant to quantize (fp32, or opt for the fused graph)."),
    check_parity: bool = typer.Option(True, "--check/--no-check", help="Check the new variant right away."),
    trust_source: TrustSourceOption = False,
) -> None:
    """Add variant int8, int8-static, fp16 or int4 from an fp32 variant, and judge it by its task's gates.

    Exit 1 if the new variant fails its gates; it stays in the bundle, marked failed."""
    from toolkit.compile.quantization import quantize as quantize_bundle

    if check_parity:
        _reference_allowed(bundle_dir, trust_source)
    kept = None if keep_fp32 is None else tuple(op.strip() for op in keep_fp32.split(",") if op.strip())
    quantize_bundle(
        bundle_dir, mode=mode.value, calibration_samples=calibration_samples, method=method.value if method else None, rounding=rounding.value if rounding else None,
        per_channel=per_channel, keep_float=keep_float, smooth=smooth, reduce_range=reduce_range, keep_fp32=kept, io=io.value if io else None, source=source, progress=_progress,
        block_size=block_size, algo=algo.value if algo else None, accuracy_level=accuracy_level, head=head.value if head else None, trust_source=trust_source,
    )
    _check_new(bundle_dir, mode.value, check_parity, _NEXT_STEPS.get(mode.value), trust_source=trust_source)


# What to try when a quantized variant fails its gates, per mode.
_NEXT_STEPS = {
    "int8": "--keep-float N keeps the N most outlier-heavy MatMul/Gemm in fp32 (toolkit build tries 2, 4, 8, ...); "
            "--full-range where the CPU has VNNI",
    "int8-static": "--method entropy or percentile (calibration ranges that clip outliers), --per-channel, "
                   "--calibration-samples with more rows; or --mode int8 (dynamic activations)",
    "fp16": "--keep-fp32 with more op types kept in fp32 (e.g. Add,Mul for residual sums that overflow)",
    "int4": "--algo hqq or gptq (scales fitted to the weights, or to calibration inputs), a smaller --block-size, "
            "or --mode int8",
}


def _reference_allowed(bundle_dir: Path, trust_source: bool) -> None:
    """Refuses, before any work, a stage whose check would rebuild a reference the user has not vouched for."""
    from toolkit.bundle import Bundle
    from toolkit.reference.source import refuse_untrusted

    refuse_untrusted(Bundle.open(bundle_dir, trust_source=trust_source))


def _check_new(bundle_dir: Path, variant: str, check_parity: bool, next_steps: str | None = None, *, trust_source: bool = False) -> None:
    if not check_parity:
        out.print(f"added variant {variant}; its parity is not checked yet (toolkit check {bundle_dir} --variant {variant})")
        return
    from toolkit.compile.parity import check as check_bundle

    records = check_bundle(bundle_dir, variants=[variant], progress=_progress, trust_source=trust_source)
    render.parity_table(out, records, f"parity: {bundle_dir} variant {variant}")
    if not records[variant]["passed"]:
        if next_steps:
            err.print(f"variant {variant} fails its gates (it stays in the bundle, marked failed); to try: {next_steps}")
        raise typer.Exit(EXIT_CHECK_FAILED)


@_command
def build(
    model: ModelArgument,
    out_dir: OutOption,
    preset: PresetOption = None,
    mode: list[Mode] | None = typer.Option(None, "--mode", help="Quantization mode (repeatable; default: int8, fp16, and int8-static for models with convolutions or a calibration set)."),
    name: NameOption = None,
    static_cache: bool | None = typer.Option(None, "--static-cache/--no-static-cache", help="Decoders: export the static-cache graph CUDA graphs replay (default: on with --provider cuda)."),
    provider: Provider = typer.Option(Provider.cpu, help="Provider `opt` is made for and on which `best` is measured (auto: CUDA where available)."),
    select: bool = typer.Option(True, "--select/--no-select", help="Time the passing variants and record the fastest as `best`."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out."),
    budget: float = typer.Option(300.0, "--budget", help="Seconds, in all, for repairing the quantized variants that fail their gates: other calibrations for int8-static, then the fewest nodes kept in fp32 that make a variant pass, found from where its error starts (`toolkit check --localize`). 0: no repair."),
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Export, optimize, quantize and check in one go, repair the quantized variants that fail their
    gates, then record the fastest variant that passed its gates as `best` (toolkit.load(DIR,
    variant="best")).

    Exit 1 if fp32 fails its parity check; other variants that fail their gates even after repair
    stay in the bundle, marked failed, and are never chosen as best."""
    from toolkit.compile.pipeline import build as build_bundle

    if budget < 0:
        raise ToolkitError(f"--budget must be at least 0 seconds, got {budget:g}.")
    bundle = build_bundle(
        model, out_dir, preset=preset, name=name, static_cache=static_cache, modes=[m.value for m in mode] if mode else None, provider=_made_for(provider),
        select=select, force=force, progress=_progress, repair_budget=budget, trust_remote_code=trust_remote_code,
    )
    manifest = bundle.manifest
    render.build_table(out, manifest, bundle.path)
    if not (manifest.variants["fp32"].parity or {}).get("passed"):
        raise typer.Exit(EXIT_CHECK_FAILED)


@_command
def prune(
    model: ModelArgument,
    out_dir: OutOption,
    amount: float = typer.Option(..., help="Share of the channels of every prunable layer group, and of the heads of every prunable attention module, to remove: between 0 and 1 (e.g. 0.3)."),
    method: PruneMethod = typer.Option(PruneMethod.l1, help="How channels are ranked: l1, the weights' magnitude; taylor, |weight × gradient| on the model's held-out inputs."),
    preset: PresetOption = None,
    name: NameOption = None,
    fine_tune: bool = typer.Option(True, "--fine-tune/--no-fine-tune", help="Fine-tune the pruned model briefly with the model's own training recipe, where it has one (the zoo's trained models)."),
    round_to: int = typer.Option(1, "--round-to", help="Leave every pruned layer group a multiple of N channels (rounded down; groups of N or fewer stay whole). onnxruntime's CPU convolutions work in blocks of 8 (AVX2) or 16 (AVX-512) channels: other counts can cost more than they save."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out."),
) -> None:
    """Remove whole channels, hidden units and attention heads from a PyTorch model (structured pruning,
    with Torch-Pruning), and export the smaller model as a bundle of its own.

    The model keeps its inputs and outputs: layers whose channels reach them (a classifier's classes,
    a decoder's KV cache) stay whole, and the manifest says why. The bundle's fp32 is checked against
    the pruned PyTorch model; the pruned model is judged against the unpruned one by its task (accuracy
    on labelled data, top-1, next-token agreement, cosine or score error).

    Exit 1 if the pruned model fails that task gate or its parity check; the bundle is written either way."""
    from toolkit.compile.prune import prune as prune_model

    bundle = prune_model(model, out_dir, amount=amount, method=method.value, preset=preset, name=name, fine_tune=fine_tune,
                         round_to=round_to, force=force, progress=_progress)
    render.pruning_table(out, bundle.manifest, bundle.path)
    if not bundle.manifest.pruning["gate"]["passed"] or not bundle.manifest.variants["fp32"].parity["passed"]:
        raise typer.Exit(EXIT_CHECK_FAILED)
    out.print(f"a bundle like any other; next: toolkit optimize {bundle.path}, toolkit quantize {bundle.path} --mode int8")


@_command
def bench(
    target: str = typer.Argument(..., metavar="DIR|MODEL", help="A bundle directory, or a model to build into a temporary bundle first."),
    providers: str | None = typer.Option(None, help="Comma-separated providers (default: every provider available here)."),
    variants: str | None = typer.Option(None, help="Comma-separated variants (default: all in the bundle)."),
    batch: str = typer.Option("1,32", help="Comma-separated batch sizes."),
    seq: str | None = typer.Option(None, help="Comma-separated sequence lengths, for models with a seq dim (default 32)."),
    preset: str | None = typer.Option(None, help="Preset, when MODEL is a reference model."),
    torch_eager: bool = typer.Option(True, "--torch/--no-torch", help="Include the PyTorch reference in eager mode (the speed-up baseline)."),
    torch_compile: bool = typer.Option(False, "--torch-compile", help="Also time torch.compile of the reference."),
    max_time: float = typer.Option(1.0, help="Seconds spent measuring each cell (candidate × shape), warm-up excluded."),
    rounds: int = typer.Option(5, help="Interleaved rounds the time of each cell is split into."),
    warmup: int = typer.Option(5, help="Untimed runs of each candidate before measuring."),
    threads: str | None = typer.Option(None, help="Comma-separated intra-op thread counts, each measured for onnxruntime and torch alike (default: the CPUs this process may use)."),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="CUDA: also time each variant replayed from a captured CUDA graph (rows <variant>+graph)."),
    json_file: Path | None = typer.Option(None, "--json", help="Write the rows and the machine as JSON to this file ('-' for stdout)."),
    csv_file: Path | None = typer.Option(None, "--csv", help="Write the rows as CSV to this file."),
    plot_file: Path | None = typer.Option(None, "--plot", help="Draw p50 latency per variant and batch to this PNG (torch eager as the reference line)."),
    trust_source: TrustSourceOption = False,
    key: KeyOption = None,
) -> None:
    """Time variants × providers × batch sizes (× thread counts) side by side with PyTorch, in interleaved rounds.

    Reports p50/p90/p99 latency, items/s, speed-up over torch eager at the same thread count,
    achieved GFLOP/s next to the machine's GEMM peak measured in the same run, and memory. On CUDA,
    inputs and outputs are bound on the device and nodes placed on the CPU are counted."""
    import tempfile

    from toolkit.bench.compare import available_providers
    from toolkit.bench.compare import bench as run_bench
    from toolkit.bundle import MANIFEST_NAME, Bundle

    chosen = _csv_list(providers, "--providers") if providers else available_providers()
    with tempfile.TemporaryDirectory(prefix="toolkit-bench-") as tmp:
        path = Path(target)
        if not (path / MANIFEST_NAME).is_file():
            if path.exists() or "/" in target:
                raise ToolkitError(f"{target} is not a bundle directory (no {MANIFEST_NAME}); give a bundle or a model name.")
            from toolkit.compile.pipeline import build as build_bundle

            _progress(f"{target} is not a bundle: building one in a temporary directory")
            path = build_bundle(target, Path(tmp) / "bundle", preset=preset, select=False, progress=_progress).path
            trust_source = True  # the user named the model
        report = run_bench(
            Bundle.open(path, trust_source=trust_source, key=key), providers=chosen, variants=_csv_list(variants, "--variants") if variants else None,
            batches=_int_list(batch, "--batch"), seqs=_int_list(seq, "--seq") if seq else None,
            torch_eager=torch_eager, torch_compile=torch_compile, max_time=max_time, rounds=rounds, warmup=warmup,
            threads=_int_list(threads, "--threads") if threads else None, cuda_graph=cuda_graph, progress=_progress,
            trust_source=trust_source,
        )
    if json_file is not None:
        text = json.dumps(report.to_json(), indent=2)
        if str(json_file) == "-":
            print(text)
        else:
            json_file.write_text(text + "\n")
    if csv_file is not None:
        csv_file.write_text(report.to_csv())
    if plot_file is not None:
        from toolkit.bench.plot import plot

        plot(report, plot_file)
    render.bench_table(err if str(json_file) == "-" else out, report)


def _csv_list(text: str, option: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ToolkitError(f"{option} {text!r}: give a comma-separated list.")
    return items


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in _csv_list(text, option)]
    except ValueError:
        raise ToolkitError(f"{option} {text!r}: expected comma-separated integers such as 1,32.") from None


@_command
def inspect(
    bundle_dir: Path = typer.Argument(..., metavar="DIR", help="Bundle directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the description as JSON."),
) -> None:
    """Show a bundle: manifest, inputs and outputs, variants with sizes, op histogram and parity."""
    from toolkit.runtime.describe import describe

    info = describe(bundle_dir)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    render.description(out, info)


@_command
def run(
    bundle_dir: Path = typer.Argument(..., metavar="DIR", help="Bundle directory."),
    inputs: list[str] | None = typer.Option(None, "--input", "-i", help="NAME=FILE.npy (repeatable); a single-input model also takes FILE.npy."),
    example: bool = typer.Option(False, "--example", help="Feed sample inputs drawn from the manifest instead of files."),
    seed: int = typer.Option(0, help="Seed for --example."),
    variant: str | None = typer.Option(None, help="Variant to run (default fp32)."),
    provider: Provider = typer.Option(Provider.auto, help="Execution provider."),
    save: Path | None = typer.Option(None, "--save", help="Write each output to DIR/NAME.npy instead of printing it."),
    key: KeyOption = None,
) -> None:
    """Run one inference and print the outputs (or save them as .npy)."""
    from toolkit.runtime.model import load

    model = load(bundle_dir, variant=variant, provider=provider.value, key=key)
    err.print(f"running {model.name} variant {model.variant} on {model.provider}"
              + (f" ({model.provider_note})" if model.provider_note else ""))
    feeds = _given_inputs(model, inputs, example, seed)
    results = model.run(feeds)
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        for name, value in results.items():
            np.save(save / f"{name}.npy", value)
        out.print(f"saved {', '.join(f'{save / n}.npy' for n in results)}")
        return
    with np.printoptions(precision=4, suppress=True, threshold=64, edgeitems=3):
        for name, value in feeds.items():
            out.print(f"input {name}: {value.dtype} {list(value.shape)}")
        for name, value in results.items():
            out.print(f"output {name}: {value.dtype} {list(value.shape)}\n{value}")
            if model.bundle.manifest.task == "classify":
                out.print(f"predicted class per row: {value.argmax(axis=-1).tolist()}")


@_command
def generate(
    bundle_dir: Path = typer.Argument(..., metavar="DIR", help="Bundle of a decoder with a KV cache (`toolkit build gpt`, `seq2seq`, or a Hugging Face causal LM or encoder-decoder: `hf:PATH`)."),
    prompts: list[str] | None = typer.Option(None, "--prompt", "-p", help="Text to continue (or, for an encoder-decoder, to answer); repeat for a batch."),
    features: list[Path] | None = typer.Option(None, "--features", help="A speech model's prompt: a .npy file of its encoder's input features, (mels, frames) as its feature extractor makes them, or (batch, mels, frames); repeatable."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens to generate at most (bytes, for the reference gpt)."),
    temperature: float = typer.Option(0.0, help="0 is greedy; above 0 samples from the scaled distribution."),
    top_k: int | None = typer.Option(None, "--top-k", help="Sample among the K most likely tokens (needs --temperature > 0)."),
    top_p: float | None = typer.Option(None, "--top-p", help="Sample within the top-P probability mass (needs --temperature > 0)."),
    seed: int | None = typer.Option(None, help="Seed for sampling: the same seed gives the same text."),
    stop: list[str] | None = typer.Option(None, "--stop", help="Stop before this text (repeatable); it is not printed."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print tokens as they arrive (a single prompt)."),
    variant: str | None = typer.Option(None, help="Variant to run (default fp32; 'best' after toolkit build)."),
    provider: Provider = typer.Option(Provider.auto, help="Execution provider."),
    cache: Cache = typer.Option(Cache.auto, help="growing: each step feeds the cache the last returned; inplace (CPU): one cache per call that each step writes into, through the variant's graph rewritten for it (fused variants: opt, int8, int4); static: a cache preallocated to the context, replayed as CUDA graphs on CUDA; auto: inplace on the CPU and static with CUDA graphs on CUDA where they apply, growing otherwise."),
    key: KeyOption = None,
) -> None:
    """Continue text with a decoder bundle (or answer it, with an encoder-decoder): greedy or sampled,
    with stop strings, streamed as it comes."""
    import time

    from toolkit.runtime.generate import Generator, Sampling

    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    generator = Generator(bundle_dir, variant=variant, provider=provider.value, cache=cache.value, key=key)
    model = generator.model
    if generator.layout.features:
        if prompts or not features:
            raise ToolkitError(f"{model.name} is a speech model: give its prompt as --features FILE.npy (its encoder's "
                               f"{generator.source.name}, {tuple(generator.source.shape[1:])}), not --prompt.")
        prompts = [clip for path in features for clip in _feature_clips(path)]
    elif features or not prompts:
        raise ToolkitError(f"{model.name} takes text: give --prompt TEXT" + (" (--features is for speech models)." if features else "."))
    notes = [n for n in (model.provider_note, generator.note) if n]
    err.print(f"generating with {model.name} variant {model.variant} on {model.provider}, {generator.decode} decoding"
              + (f" ({'; '.join(notes)})" if notes else ""))
    options = {"max_new_tokens": max_new_tokens, "stop": stop or (), "sampling": sampling}
    start = time.perf_counter()
    echo = generator.layout.encoder is None  # a decoder continues its prompt; an encoder-decoder answers it
    if stream and len(prompts) == 1:
        out.print(prompts[0] if echo else "", end="")
        texts = [""]
        for piece in generator.stream(prompts[0], **options):
            out.print(piece, end="")
            out.file.flush()
            texts[0] += piece
        out.print()
    else:
        texts = generator.generate(prompts, **options)
        for prompt, text in zip(prompts, texts, strict=True):
            out.print((prompt if echo else "") + text + ("\n---" if len(prompts) > 1 else ""))
    tokens = sum(len(generator.tokenizer.encode(t)) for t in texts)
    err.print(f"{tokens} tokens in {time.perf_counter() - start:.2f} s")


def _feature_clips(path: Path) -> list[Any]:
    """The clips of a .npy file of features: one (mels, frames), or a batch (batch, mels, frames)."""
    import numpy as np

    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ToolkitError(f"--features {path}: not a readable .npy array: {exc}") from exc
    return [array] if array.ndim == 2 else list(array)


def _given_inputs(model: Any, inputs: list[str] | None, example: bool, seed: int) -> dict[str, np.ndarray]:
    """The feeds of `--input NAME=FILE.npy ...`, or of `--example` (drawn from the manifest): one of the two."""
    if example == bool(inputs):
        raise ToolkitError("give the inputs with --input NAME=FILE.npy, or pass --example for sample inputs (one of the two).")
    if example:
        from toolkit.runtime.samples import make_feeds

        return make_feeds(model.inputs, {d.name: d.check[0] for d in model.bundle.manifest.dims}, seed)
    return _read_inputs(inputs, [t.name for t in model.inputs])


def _read_inputs(pairs: list[str], names: list[str]) -> dict[str, np.ndarray]:
    feeds = {}
    for pair in pairs:
        name, sep, file = pair.partition("=")
        if not sep:
            if len(names) != 1:
                raise ToolkitError(f"--input {pair!r}: write NAME=FILE.npy; the model's inputs are {', '.join(names)}.")
            name, file = names[0], pair
        path = Path(file)
        if not path.is_file():
            raise ToolkitError(f"--input {name}: file {file} does not exist.")
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ToolkitError(f"--input {name}: {file} is not a readable .npy file ({exc}).") from exc
    return feeds


# The commands of their own modules register on `app` as they are imported.
from toolkit.cli import attribution, security, serving  # noqa: E402, F401


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        # click reports usage errors with exit code 2; keep that contract visible here.
        raise SystemExit(exc.code if exc.code is not None else 0) from None


