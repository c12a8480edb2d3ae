"""Attributions as a person reads them: a heat map over an image and bars for a vector's strongest
features (PNG, with matplotlib), tokens shaded by their attribution (HTML, self-contained: no
script, no outside request; and in the terminal), generated tokens' contexts shaded."""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError

__all__ = ["plot", "plot_generation", "shaded"]

_BARS = 20  # a vector's features shown, the strongest first


def plot(explanation: Any, feeds: Mapping[str, np.ndarray], path: str | Path, *,
         token_text: Callable[[int], str] | None = None) -> Path:
    """Writes `explanation`'s attributions to `path`: `.png` (images, vectors, tokens as bars) or
    `.html` (tokens shaded; `token_text` turns an id into its text, default the id)."""
    path = Path(path)
    if path.suffix == ".html":
        tokens = [name for name in explanation.attributions if np.asarray(feeds[name]).dtype.kind in "iu"]
        if not tokens:
            raise ToolkitError(f"{path.name}: HTML shades tokens, and this model's attributed inputs are not token ids; write a .png.")
        path.write_text(_html(explanation, feeds, tokens, token_text or str), encoding="utf-8")
        return path
    if path.suffix != ".png":
        raise ToolkitError(f"--plot {path}: give a .png (heat maps, bars) or an .html file (tokens shaded).")
    _png(explanation, feeds, path)
    return path


def _png(explanation: Any, feeds: Mapping[str, np.ndarray], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise ToolkitError("--plot with a .png needs matplotlib: pip install 'toolkit[bench]'.") from None
    panels = [(name, row) for name in explanation.attributions for row in range(len(explanation.target))]
    images = [name for name in explanation.attributions if explanation.attributions[name].ndim >= 3]
    columns = 2 if images else 1
    figure, axes = plt.subplots(len(panels), columns, figsize=(4 * columns, 3.2 * len(panels)), squeeze=False)
    for (name, row), ax in zip(panels, axes, strict=True):
        values = explanation.attributions[name][row]
        title = f"{name}, row {row}: {explanation.output}{explanation.where(row)} = {explanation.score[row]:.3g}"
        if values.ndim >= 2:
            _heat_map(ax, np.asarray(feeds[name][row], dtype=np.float64), values, title)
        else:
            _bars(ax[0], values, title)
            for extra in ax[1:]:
                extra.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _heat_map(axes: Sequence[Any], image: np.ndarray, values: np.ndarray, title: str) -> None:
    """The input (channels averaged) beside its attributions (channels summed) on a diverging scale
    centred on 0: red raised the score, blue lowered it."""
    picture = image.reshape(-1, *image.shape[-2:]).mean(axis=0)
    heat = values.reshape(-1, *values.shape[-2:]).sum(axis=0)
    bound = float(np.abs(heat).max()) or 1.0
    axes[0].imshow(picture, cmap="gray")
    axes[0].set_title(title, fontsize=8)
    shown = axes[1].imshow(heat, cmap="bwr", vmin=-bound, vmax=bound)
    axes[1].set_title("attribution (red: raised the score)", fontsize=8)
    for ax in axes:
        ax.axis("off")
    axes[1].figure.colorbar(shown, ax=axes[1], fraction=0.046)


def _bars(ax: Any, values: np.ndarray, title: str) -> None:
    order = np.argsort(-np.abs(values))[:_BARS][::-1]
    ax.barh([str(i) for i in order], values[order], color=["tab:red" if v > 0 else "tab:blue" for v in values[order]])
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("attribution")


def _html(explanation: Any, feeds: Mapping[str, np.ndarray], names: list[str], token_text: Callable[[int], str]) -> str:
    rows = []
    for name in names:
        for row in range(len(explanation.target)):
            values = explanation.attributions[name][row]
            caption = f"{html.escape(name)}, row {row}: {html.escape(explanation.output)}{explanation.where(row)} = {explanation.score[row]:.4g}"
            rows.append(f"<p><b>{caption}</b><br>{_spans([token_text(t) for t in np.asarray(feeds[name][row]).tolist()], values)}</p>")
    return _page(rows)


def plot_generation(explained: Any, path: str | Path) -> Path:
    """Writes a `GenerationExplanation` as HTML: per generated token, its context shaded by credit."""
    path = Path(path)
    if path.suffix != ".html":
        raise ToolkitError(f"--plot {path}: generated tokens are drawn as shaded text; give an .html file.")
    pieces = explained.texts()
    rows = []
    for k, token in enumerate(explained.tokens):
        length = explained.context(k)
        caption = f"{html.escape(repr(pieces[len(explained.prompt) + k]))} (token {token}, log p {explained.logprob[k]:.3g})"
        rows.append(f"<p><b>{caption}</b><br>{_spans(pieces[:length], explained.attributions[k, :length])}</p>")
    path.write_text(_page(rows), encoding="utf-8")
    return path


def shaded(pieces: Sequence[str], values: np.ndarray) -> Any:
    """Tokens as rich `Text` for the terminal, each on a background shaded by its attribution (red
    raised the score, blue lowered it; line breaks and tabs shown as ⏎ and ⇥)."""
    from rich.text import Text

    bound = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 0.0
    text = Text()
    for piece, value in zip(pieces, np.nan_to_num(values).tolist(), strict=True):
        weight = min(1.0, abs(value) / bound) if bound else 0.0
        fade = int(255 * (1 - weight))
        colour = f"rgb(255,{fade},{fade})" if value > 0 else f"rgb({fade},{fade},255)"
        text.append(piece.replace("\n", "⏎").replace("\t", "⇥"), style=f"black on {colour}")
    return text


def _spans(pieces: Sequence[str], values: np.ndarray) -> str:
    bound = float(np.abs(values).max()) or 1.0
    spans = []
    for piece, value in zip(pieces, np.asarray(values).tolist(), strict=True):
        alpha = min(1.0, abs(value) / bound)
        colour = f"rgba(220,40,40,{alpha:.2f})" if value > 0 else f"rgba(40,80,220,{alpha:.2f})"
        spans.append(f'<span style="background:{colour};white-space:pre" title="{value:+.4g}">{html.escape(piece)}</span>')
    return " ".join(spans)


def _page(rows: list[str]) -> str:
    return ("<!doctype html><meta charset=\"utf-8\"><title>attributions</title>"
            "<body style=\"font-family:sans-serif;line-height:2\"><p>red raised the score, blue lowered it</p>" + "".join(rows) + "</body>\n")
