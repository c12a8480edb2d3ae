"""`toolkit bench --plot`: p50 latency per variant (and thread count) and shape, one panel per
provider, with torch eager (its fastest thread count) drawn as the reference line of each shape."""

from __future__ import annotations

from pathlib import Path

from toolkit.bench.candidates import TORCH_EAGER
from toolkit.bench.report import BenchReport
from toolkit.errors import ToolkitError

__all__ = ["plot"]


def plot(report: BenchReport, path: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise ToolkitError("--plot needs matplotlib: pip install 'toolkit[bench]'.") from None
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ToolkitError(f"--plot {path}: give a .png file name.")
    providers = sorted({r.provider for r in report.rows})
    fig, axes = plt.subplots(1, len(providers), figsize=(6 * len(providers), 4.5), squeeze=False)
    for ax, provider in zip(axes[0], providers, strict=True):
        rows = [r for r in report.rows if r.provider == provider]
        shapes = list(dict.fromkeys((r.batch, r.seq) for r in rows))
        several = len({r.threads for r in rows}) > 1
        series = list(dict.fromkeys((r.variant, r.threads) for r in rows if r.variant != TORCH_EAGER))
        width = 0.8 / max(len(series), 1)
        p50 = {(r.variant, r.threads, r.batch, r.seq): r.p50_ms for r in rows}
        for i, (variant, threads) in enumerate(series):
            xs = [s + (i - (len(series) - 1) / 2) * width for s in range(len(shapes))]
            ax.bar(xs, [p50.get((variant, threads, *shape), 0) for shape in shapes], width,
                   label=f"{variant}, {threads} thread{'s' * (threads > 1)}" if several else variant)
        torch_label = f"{TORCH_EAGER}, fastest thread count" if several else TORCH_EAGER
        for s, shape in enumerate(shapes):
            torch_p50 = [r.p50_ms for r in rows if r.variant == TORCH_EAGER and (r.batch, r.seq) == shape]
            if torch_p50:
                ax.hlines(min(torch_p50), s - 0.45, s + 0.45, colors="black", linewidth=2, label=torch_label if s == 0 else None)
        ax.set_xticks(range(len(shapes)), [f"batch {b}" + (f"\nseq {q}" if q is not None else "") for b, q in shapes])
        ax.set_yscale("log")
        ax.set_ylabel("p50 latency (ms, log scale)")
        ax.set_title(f"{rows[0].model} on {provider}" if rows else provider)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
