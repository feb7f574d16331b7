"""Figures are drawn without error, have the expected layout, and save as non-empty PNGs."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch

from ddlib import plots
from ddlib.synset import SyntheticSet, class_labels

DATASET = {"name": "toy", "channels": 1, "image_size": 6, "num_classes": 3, "class_names": ["a", "b", "c"],
           "mean": [0.5], "std": [0.25], "zca": False}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _synset(channels: int = 1, ipc: int = 4) -> SyntheticSet:
    images = torch.randn(3 * ipc, channels, 6, 6, generator=torch.Generator().manual_seed(0))
    dataset = dict(DATASET, channels=channels, mean=[0.5] * channels, std=[0.25] * channels)
    return SyntheticSet(images, class_labels(3, ipc), meta={"dataset": dataset})


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 100 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("channels", [1, 3])
def test_image_grid_rows_are_classes(tmp_path, channels):
    fig = plots.image_grid(_synset(channels), title="toy", max_per_class=3)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    shown = ax.get_images()[0].get_array()
    assert shown.shape[:2] == (3 * 7, 3 * 7)  # 3 rows x 3 columns of 6-pixel tiles, 1-pixel gaps
    assert 0 <= shown.min() and shown.max() <= 1
    assert _is_png(plots.save_figure(fig, tmp_path / "deep" / "grid.png"))


def test_image_grid_of_bare_tensor_uses_meta_and_denormalises():
    images = torch.full((6, 1, 6, 6), -2.0)  # normalised value -2 -> pixel 0.5 + 0.25 * -2 = 0
    fig = plots.image_grid(images, meta=DATASET, class_names=["x", "y", "z"])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["x", "y", "z"]
    tile = ax.get_images()[0].get_array()[:6, :6]
    assert float(tile.max()) == pytest.approx(0.0)


def test_image_grid_draws_on_a_given_axes():
    fig, (left, right) = plt.subplots(1, 2)
    assert plots.image_grid(_synset(), ax=right) is fig
    assert right.get_images() and not left.get_images()


def test_evolution_strip_columns_are_iterations(tmp_path):
    snapshots = [(it, _synset().images.half()) for it in (0, 100, 200)]
    fig = plots.evolution_strip(snapshots, {"dataset": DATASET}, images_per_class_shown=2)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["it 0", "it 100", "it 200"]
    assert ax.get_images()[0].get_array().shape[:2] == (3 * 7, 6 * 7)
    assert _is_png(plots.save_figure(fig, tmp_path / "strip"))  # ".png" is added


def test_evolution_viewer_is_static_outside_a_kernel(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    assert not plots.widgets_available()  # pytest is not a Jupyter kernel
    snapshots = [(0, _synset().images), (10, _synset().images)]
    assert isinstance(plots.evolution_viewer(snapshots, DATASET), matplotlib.figure.Figure)
    monkeypatch.setenv("DDLIB_STATIC_PLOTS", "1")
    assert not plots.widgets_available()


def test_evolution_viewer_builds_a_slider_when_asked():
    pytest.importorskip("ipywidgets")
    snapshots = [(0, _synset().images), (10, _synset().images)]
    widget = plots.evolution_viewer(snapshots, DATASET, interactive=True)
    slider = widget.children[0]
    assert (slider.min, slider.max, slider.value) == (0, 1, 1)


def test_curves_and_majority_line(tmp_path):
    history = {"iteration": [0, 10, 20, 30], "loss": [4.0, 2.0, 1.0, 0.5], "accuracy": [50, 60, 65, 70]}
    fig = plots.curves(history, ("loss",), logy=True)
    line = fig.axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [0, 10, 20, 30] and fig.axes[0].get_yscale() == "log"
    fig = plots.curves(history, ("accuracy",))
    plots.majority_line(fig.axes[0], 63.15)
    assert fig.axes[0].get_lines()[-1].get_ydata()[0] == pytest.approx(63.15)
    assert _is_png(plots.save_figure(fig, tmp_path / "curves.png", dpi=60))
    with pytest.raises(KeyError, match="no nope"):
        plots.curves(history, ("nope",))


def test_results_heatmap_annotates_mean_and_std_in_percent(tmp_path):
    df = pd.DataFrame({
        "method": ["random", "random", "dm", "dm"],
        "ipc": [1, 10, 1, 10],
        "accuracy_mean": [0.649, 0.951, 0.897, 0.975],
        "accuracy_std": [0.035, 0.009, 0.006, 0.001],
    })
    fig = plots.results_heatmap(df, index="method", columns="ipc")
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert "64.9 ± 3.5" in texts and "97.5 ± 0.1" in texts
    assert _is_png(plots.save_figure(fig, tmp_path / "table.png"))


def test_accuracy_bars_zoom_to_the_bars_and_reference_lines(tmp_path):
    table = pd.DataFrame({"accuracy": [95.4, 95.3, 92.3], "± std": [0.2, 0.2, 0.4]}, index=["mtt", "datm", "random"])
    low, high = plots.accuracy_bars(table, "close methods").axes[0].get_ylim()
    assert 85 < low < 91.9 and 95.6 < high <= 100  # a 0-100 axis would hide a 1-point gap
    fig = plots.accuracy_bars(table.assign(accuracy=[70.0, 66.0, 64.0]), majority_rate=63.15, line=76.9)
    low, high = fig.axes[0].get_ylim()
    assert low < 63.15 and high > 76.9
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["mtt", "datm", "random"]
    assert _is_png(plots.save_figure(fig, tmp_path / "bars.png"))


def test_save_figure_refuses_other_formats(tmp_path):
    fig, _ = plt.subplots()
    with pytest.raises(ValueError, match="PNG"):
        plots.save_figure(fig, tmp_path / "figure.pdf")
