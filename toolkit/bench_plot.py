"""`toolkit bench --plot`: p50 latency per variant and shape, one panel per provider, with torch
eager drawn as the reference line of each shape."""

from __future__ import annotations

from pathlib import Path

from toolkit.bench import TORCH_EAGER, BenchReport
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
        variants = list(dict.fromkeys(r.variant for r in rows if r.variant != TORCH_EAGER))
        width = 0.8 / max(len(variants), 1)
        p50 = {(r.variant, r.batch, r.seq): r.p50_ms for r in rows}
        for i, variant in enumerate(variants):
            xs = [s + (i - (len(variants) - 1) / 2) * width for s in range(len(shapes))]
            ax.bar(xs, [p50.get((variant, *shape), 0) for shape in shapes], width, label=variant)
        for s, shape in enumerate(shapes):
            if (TORCH_EAGER, *shape) in p50:
                ax.hlines(p50[(TORCH_EAGER, *shape)], s - 0.45, s + 0.45, colors="black", linewidth=2,
                          label=TORCH_EAGER if s == 0 else None)
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
