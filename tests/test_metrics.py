"""FLOPs against hand counts, cost meters, and classification metrics against scikit-learn."""
from __future__ import annotations

import math
import mmap

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from torch import nn

from ddlib.metrics import (
    PeakMemory,
    Timer,
    accuracy,
    balanced_accuracy,
    classification_metrics,
    count_flops,
    mean_std,
    peak_rss_bytes,
    roc_auc,
    training_flops,
)


def _small_convnet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 10),
    )


# ---------------------------------------------------------------------------------------------- FLOPs
def test_linear_flops_are_two_per_mac():
    assert count_flops(nn.Linear(20, 7), (20,)) == 2 * 20 * 7


def test_conv_flops_are_two_per_mac():
    conv = nn.Conv2d(3, 5, kernel_size=3, padding=1)  # output 5 x 8 x 8, each 3*3*3 MACs
    assert count_flops(conv, (3, 8, 8)) == 2 * (5 * 8 * 8) * (3 * 3 * 3)


def test_small_convnet_flops_match_hand_count():
    macs = 8 * 16 * 16 * 9 * 1 + 16 * 8 * 8 * 9 * 8 + 16 * 4 * 4 * 9 * 16 + 64 * 10
    assert count_flops(_small_convnet(), (1, 16, 16)) == 2 * macs


def test_backward_is_about_three_forwards():
    net = _small_convnet()
    forward = count_flops(net, (1, 16, 16))
    step = count_flops(net, (1, 16, 16), backward=True)
    assert 2.5 <= step / forward <= 3.5


@pytest.mark.parametrize("training", [True, False])
def test_count_flops_leaves_the_net_untouched(training):
    net = _small_convnet().train(training)
    bn = net[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    count_flops(net, (1, 16, 16), backward=True)
    count_flops(net, (1, 16, 16))
    assert all(m.training == training for m in net.modules())
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2]


def test_training_flops_multiplies_out():
    assert training_flops(300, num_images=100, epochs=20) == 300 * 100 * 20


# ---------------------------------------------------------------------------------------------- time and memory
def test_peak_memory_on_cpu_is_positive_and_sees_an_allocation():
    # A fresh anonymous mapping, not a tensor: the allocator may hand a tensor memory that an earlier test
    # freed but left resident, and then the block truly grows nothing (seen once under xdist in CI).
    size = 32_000_000
    with PeakMemory("cpu") as memory:
        block = mmap.mmap(-1, size)
        block.write(b"\x01" * size)  # touched, so every page is resident
    block.close()
    assert memory.peak_bytes > 0
    assert memory.source in ("cpu_peak_rss", "cpu_lifetime_peak_rss")
    if memory.source == "cpu_peak_rss":
        assert memory.growth_bytes >= 16_000_000
    assert peak_rss_bytes() >= memory.peak_bytes // 2


def test_timer_measures_seconds():
    with Timer("cpu") as timer:
        torch.ones(1000).sum()
    assert 0 <= timer.seconds < 5


# ---------------------------------------------------------------------------------------------- classification
def test_accuracy_from_logits_and_predictions():
    labels = torch.tensor([0, 1, 2, 1])
    logits = torch.eye(3)[[0, 1, 1, 1]]
    assert accuracy(logits, labels) == pytest.approx(0.75)
    assert accuracy(torch.tensor([0, 1, 1, 1]), labels) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(5))
def test_balanced_accuracy_matches_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (200,), generator=g)
    labels[labels == 3] = torch.randint(0, 4, (int((labels == 3).sum()),), generator=g)  # imbalanced classes
    preds = torch.where(torch.rand(200, generator=g) < 0.6, labels, torch.randint(0, 4, (200,), generator=g))
    expected = balanced_accuracy_score(labels.numpy(), preds.numpy())
    assert balanced_accuracy(preds, labels, 4) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_sklearn_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(300, generator=g) < 0.3).long()
    scores = torch.randint(0, 10, (300,), generator=g).float() + labels  # few distinct values: many ties
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)


def test_roc_auc_is_nan_with_one_class():
    assert math.isnan(roc_auc(torch.rand(5), torch.ones(5, dtype=torch.long)))


def test_classification_metrics_binary_includes_auc():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (100,), generator=g)
    logits = torch.randn(100, 2, generator=g) + torch.nn.functional.one_hot(labels, 2)
    result = classification_metrics(logits, labels)
    assert set(result) == {"accuracy", "balanced_accuracy", "auc"}
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in result.values())
    probability = logits.softmax(1)[:, 1].numpy()
    assert result["auc"] == pytest.approx(roc_auc_score(labels.numpy(), probability), abs=1e-9)


def test_classification_metrics_multiclass_has_no_auc():
    result = classification_metrics(torch.randn(10, 5, generator=torch.Generator().manual_seed(1)),
                                    torch.arange(10) % 5)
    assert set(result) == {"accuracy", "balanced_accuracy"}


def test_mean_std_is_population_std():
    values = [97.0, 98.0, 99.5]
    mean, std = mean_std(values)
    assert mean == pytest.approx(np.mean(values))
    assert std == pytest.approx(np.std(values, ddof=0))
