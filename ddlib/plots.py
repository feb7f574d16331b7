"""Figures: image grids per class, the evolution of a synthetic set, training curves, result heatmaps.

Every function draws with matplotlib's object API on the given ``ax`` (or a new figure) and returns the
``Figure``; nothing here picks a backend, so notebooks show figures inline and tests can use Agg.
``save_figure`` writes PNGs atomically at a modest dpi to keep repositories small.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from ddlib.io import atomic_write
from ddlib.synset import SyntheticSet

__all__ = [
    "accuracy_bars",
    "curves",
    "denormalise",
    "evolution_strip",
    "evolution_viewer",
    "image_grid",
    "majority_line",
    "results_heatmap",
    "save_figure",
    "widgets_available",
]

_PAD = 1  # pixels of white between tiles: separates images without a per-image Axes (one imshow is fast)


# ---------------------------------------------------------------------------------------------- image grids
def image_grid(synset_or_images: SyntheticSet | Tensor, *, meta: dict | None = None, nrow: int | None = None,
               class_names: Sequence[str] | None = None, ax: Axes | None = None, title: str | None = None,
               max_per_class: int = 10, labels: Tensor | None = None) -> Figure:
    """One row per class, up to ``max_per_class`` images each, in pixel scale [0, 1].

    ``synset_or_images``: a ``SyntheticSet`` (denormalised with its own meta, ZCA included) or images
    [N, C, H, W] in the dataset's normalised space, denormalised with ``meta`` (a synthetic set's meta or
    ``RealSet.meta()``). Bare images take their classes from ``labels`` [N], or are assumed ordered by
    class in equal blocks of ``N / nrow`` (``nrow`` defaults to meta's ``num_classes``, else 1 row).
    Row labels come from ``class_names``, else meta's ``class_names``, else the class index.
    """
    if isinstance(synset_or_images, SyntheticSet):
        meta = synset_or_images.meta if meta is None else meta
        pixels, labels = synset_or_images.denormalised(), synset_or_images.hard_labels.cpu()
    else:
        pixels = denormalise(synset_or_images, meta)
        labels = _block_labels(len(pixels), nrow, meta) if labels is None else torch.as_tensor(labels).cpu()
    num_classes = max(int(labels.max()) + 1 if len(labels) else 0, _dataset(meta).get("num_classes", 0))
    rows = [pixels[labels == c][:max_per_class] for c in range(num_classes)]
    fig, ax = _figure_and_axes(ax, width=max(1, max(len(r) for r in rows)), height=num_classes)
    canvas = _mosaic([[row] for row in rows], pixels.shape[1:])
    _show(ax, canvas)
    _label_rows(ax, _class_names(class_names, meta, num_classes), pixels.shape[-2])
    if title:
        ax.set_title(title)
    return fig


def evolution_strip(snapshots: list[tuple[int, Tensor]], meta: dict, *, images_per_class_shown: int = 1,
                    ax: Axes | None = None, class_names: Sequence[str] | None = None) -> Figure:
    """Rows = classes, columns = saved iterations: how the synthetic images change while learning.

    ``snapshots``: [(iteration, images [N, C, H, W])] with images ordered by class in equal blocks (as
    distillation stores them, any float dtype), in the normalised space that ``meta`` describes.
    """
    if not snapshots:
        raise ValueError("no snapshots to show: distil with snapshot_every > 0")
    num_classes = int(_dataset(meta).get("num_classes") or 1)
    first = snapshots[0][1]
    grid = []  # grid[class][snapshot] = [images_per_class_shown, C, H, W]
    for _, images in snapshots:
        pixels = denormalise(images, meta)
        per_class = pixels.view(num_classes, -1, *pixels.shape[1:])[:, :images_per_class_shown]
        grid.append(list(per_class))
    grid = [list(column) for column in zip(*grid)]
    shown = min(images_per_class_shown, len(first) // num_classes)
    fig, ax = _figure_and_axes(ax, width=len(snapshots) * shown, height=num_classes)
    _show(ax, _mosaic(grid, first.shape[1:]))
    _label_rows(ax, _class_names(class_names, meta, num_classes), first.shape[-2])
    _label_columns(ax, [f"it {it}" for it, _ in snapshots], shown * (first.shape[-1] + _PAD))
    return fig


def evolution_viewer(snapshots: list[tuple[int, Tensor]], meta: dict, *, interactive: bool | None = None) -> Any:
    """A slider over saved iterations showing the whole set at that iteration, or a static strip.

    ``interactive=None`` decides with ``widgets_available()``: ipywidgets importable, running inside a
    Jupyter kernel, and neither ``CI`` nor ``DDLIB_STATIC_PLOTS`` set in the environment. A kernel cannot
    tell whether a widget frontend is attached (papermill's and a browser's look the same), so batch
    runs set ``DDLIB_STATIC_PLOTS=1`` and always get the static ``evolution_strip`` figure, which is
    saved into the executed notebook. Returns the widget or the Figure.
    """
    if interactive is None:
        interactive = widgets_available()
    if not interactive:
        return evolution_strip(snapshots, meta)
    import ipywidgets as widgets

    def show(index: int) -> None:
        iteration, images = snapshots[index]
        image_grid(images, meta=meta, title=f"iteration {iteration}")
        plt.show()

    slider = widgets.IntSlider(value=len(snapshots) - 1, min=0, max=len(snapshots) - 1, step=1,
                               description="snapshot", continuous_update=False)
    return widgets.interactive(show, index=slider)


def widgets_available() -> bool:
    """True when an ipywidgets slider can be shown: see ``evolution_viewer``."""
    if os.environ.get("CI") or os.environ.get("DDLIB_STATIC_PLOTS"):
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def denormalise(images: Tensor, meta: dict | None) -> Tensor:
    """[N, C, H, W] from the normalised (or ZCA) space ``meta`` describes to pixels in [0, 1] on the CPU."""
    meta = meta or {}
    full = meta if "dataset" in meta else {"dataset": meta, "zca_state": meta.get("zca_state")}
    images = images.detach().cpu().float()
    labels = torch.zeros(len(images), dtype=torch.int64)
    return SyntheticSet(images, labels, None, full).denormalised()


# ---------------------------------------------------------------------------------------------- curves and tables
def curves(history: dict[str, list], keys: Sequence[str] = ("loss",), *, x: str = "iteration",
           ax: Axes | None = None, logy: bool = False) -> Figure:
    """Line plot of ``history[key]`` against ``history[x]`` (or the record index when absent) per key."""
    missing = [k for k in keys if k not in history]
    if missing:
        raise KeyError(f"history has no {', '.join(missing)}; it has {', '.join(sorted(history))}")
    fig, ax = _figure_and_axes(ax, figsize=(6, 4))
    for key in keys:
        values = np.asarray(history[key], dtype=float)
        xs = np.asarray(history[x], dtype=float) if len(history.get(x, ())) == len(values) else np.arange(len(values))
        ax.plot(xs, values, label=key)
    ax.set_xlabel(x if x in history else "record")
    ax.set_yscale("log" if logy else "linear")
    ax.grid(alpha=0.3)
    if len(keys) > 1:
        ax.legend()
    else:
        ax.set_ylabel(keys[0])
    return fig


def results_heatmap(df: Any, index: str, columns: str, values: str = "accuracy_mean", std: str | None = "accuracy_std",
                    ax: Axes | None = None, fmt: str = "{:.1f}") -> Figure:
    """Seaborn heatmap of ``values`` pivoted to ``index`` × ``columns``, annotated "mean ± std" in percent.

    Values in [0, 1] are taken as fractions and shown ×100; duplicate cells are averaged.
    """
    import seaborn as sns

    means = df.pivot_table(index=index, columns=columns, values=values, aggfunc="mean")
    stds = df.pivot_table(index=index, columns=columns, values=std, aggfunc="mean") if std in df else None
    scale = 100.0 if np.nanmax(np.abs(means.to_numpy(dtype=float))) <= 1.0 else 1.0
    means = means * scale
    spread = None if stds is None else stds.reindex_like(means).to_numpy(dtype=float) * scale
    text = _mean_std_text(means.to_numpy(dtype=float), spread, fmt)
    fig, ax = _figure_and_axes(ax, figsize=(1.6 * means.shape[1] + 2, 0.6 * means.shape[0] + 1.5))
    sns.heatmap(means, annot=text, fmt="", cmap="viridis", ax=ax, cbar_kws={"label": f"{values} (%)"})
    return fig


def accuracy_bars(table: Any, title: str = "", *, value: str = "accuracy", std: str | None = "± std",
                  line: float | None = None, line_label: str | None = None, majority_rate: float | None = None,
                  ax: Axes | None = None) -> Figure:
    """Bar per row of ``table`` (a DataFrame, accuracies in percent) with ± std error bars.

    The y-axis is zoomed to the bars' range (from a little below the lowest ``mean - std``, or the reference
    lines, to 100 at most), because methods a point apart look identical on a 0-100 axis. ``line`` draws a dashed
    reference (full data, say); ``majority_rate`` (percent) the majority-class line of a binary task.
    """
    means = table[value].astype(float).to_numpy()
    errs = table[std].astype(float).fillna(0).to_numpy() if std and std in table else np.zeros_like(means)
    fig, ax = _figure_and_axes(ax, figsize=(1.1 * len(means) + 2.5, 3.2))
    positions = np.arange(len(means))
    ax.bar(positions, means, yerr=errs, capsize=3, color="tab:blue")
    ax.set_xticks(positions, [str(i) for i in table.index], rotation=30, ha="right")
    ax.set_ylabel(f"test {value} (%)")
    ax.set_title(title)
    refs = [r for r in (line, majority_rate) if r is not None]
    low = min([*(means - errs), *refs])
    high = max([*(means + errs), *refs])
    margin = max(0.15 * (high - low), 0.5)
    top = high + margin
    ax.set_ylim(max(0.0, low - margin), top if high > 100 else min(100.0, top))
    if line is not None:
        ax.axhline(line, color="k", ls="--", lw=1, label=line_label or f"reference ({line:g})")
        ax.legend(loc="lower right")
    if majority_rate is not None:
        majority_line(ax, majority_rate)
    return fig


def _mean_std_text(means: np.ndarray, stds: np.ndarray | None, fmt: str) -> np.ndarray:
    """Cell labels "m ± s" (just "m" without a std, "" for empty cells), same shape as ``means``."""
    text = np.full(means.shape, "", dtype=object)
    for i, j in np.ndindex(means.shape):
        if np.isnan(means[i, j]):
            continue
        text[i, j] = fmt.format(means[i, j])
        if stds is not None and not np.isnan(stds[i, j]):
            text[i, j] += " ± " + fmt.format(stds[i, j])
    return text


def majority_line(ax: Axes, rate: float, label: str = "majority class") -> None:
    """Dashed horizontal line at ``rate`` (same units as the axis, e.g. 63.15 for MHIST in percent)."""
    ax.axhline(rate, linestyle="--", color="grey", linewidth=1, label=f"{label} ({rate:g})")
    ax.legend()


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write ``fig`` as PNG to ``path`` (".png" added if missing), atomically, creating folders."""
    path = Path(path)
    if path.suffix == "":
        path = path.with_suffix(".png")
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_figure writes PNG files; got {path.name!r}")
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))


# ---------------------------------------------------------------------------------------------- helpers
def _dataset(meta: dict | None) -> dict:
    meta = meta or {}
    return meta.get("dataset", meta)


def _class_names(names: Sequence[str] | None, meta: dict | None, num_classes: int) -> list[str]:
    names = list(names) if names is not None else list(_dataset(meta).get("class_names") or [])
    return names if len(names) >= num_classes else [str(c) for c in range(num_classes)]


def _block_labels(n: int, nrow: int | None, meta: dict | None) -> Tensor:
    """[n] labels for class-ordered images in equal blocks; one block when ``n`` doesn't divide."""
    rows = nrow or int(_dataset(meta).get("num_classes") or 1)
    if n % rows:
        rows = 1
    return torch.arange(rows).repeat_interleave(n // rows)


def _mosaic(grid: list[list[Tensor]], image_shape: torch.Size) -> np.ndarray:
    """grid[row][group] = [m, C, H, W] pixels → one [rows·(H+pad), cols·(W+pad), C] array on white."""
    channels, height, width = image_shape
    cols = max((sum(len(g) for g in row) for row in grid), default=0)
    canvas = torch.ones(channels, len(grid) * (height + _PAD), max(cols, 1) * (width + _PAD))
    for r, row in enumerate(grid):
        tiles = [img for group in row for img in group]
        for col, img in enumerate(tiles):
            top, left = r * (height + _PAD), col * (width + _PAD)
            canvas[:, top:top + height, left:left + width] = img
    return canvas.permute(1, 2, 0).numpy()


def _show(ax: Axes, canvas: np.ndarray) -> None:
    gray = canvas.shape[-1] == 1
    ax.imshow(canvas[..., 0] if gray else canvas, cmap="gray" if gray else None, vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _label_rows(ax: Axes, names: list[str], height: int) -> None:
    step = height + _PAD
    ax.set_yticks([r * step + height / 2 for r in range(len(names))], names)
    ax.tick_params(axis="y", length=0)


def _label_columns(ax: Axes, names: list[str], step: int) -> None:
    ax.set_xticks([c * step + (step - _PAD) / 2 for c in range(len(names))], names, rotation=45)
    ax.tick_params(axis="x", length=0)


def _figure_and_axes(ax: Axes | None, width: int = 0, height: int = 0,
                     figsize: tuple[float, float] | None = None) -> tuple[Figure, Axes]:
    """``ax``'s figure, or a new one sized ~0.6 in per tile (capped so 100-class grids stay readable)."""
    if ax is not None:
        return ax.figure, ax
    size = figsize or (min(0.6 * width + 1.2, 16), min(0.6 * height + 0.6, 40))
    fig, ax = plt.subplots(figsize=size)
    return fig, ax
