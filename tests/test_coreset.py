"""Coreset baselines on small hand-made real sets."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from ddlib.data import from_tensors
from ddlib.methods.coreset import select, select_herding, select_kcenter, select_random
from ddlib.rng import generator

METHODS = ("random", "herding", "kcenter")


class FlattenEmbed(nn.Module):
    """Stand-in feature network: the embedding is the (normalised) pixels themselves."""

    def embed(self, x: Tensor) -> Tensor:
        return x.flatten(1)


def _real(num_classes: int = 3, per_class: int = 30, size: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat(per_class)[torch.randperm(num_classes * per_class, generator=g)]
    images = torch.rand(len(labels), 1, size, size, generator=g) * 0.5 + labels.view(-1, 1, 1, 1) * 0.2
    return from_tensors("toy", images, labels, images[:num_classes], labels[:num_classes])


def _pick(method: str, real, ipc: int, seed: int = 0):
    kwargs = {} if method == "random" else {"model": FlattenEmbed()}
    return select(method, real, ipc, seed=seed, **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_shapes_labels_and_provenance(method):
    real = _real()
    synset = _pick(method, real, 5)
    assert synset.images.shape == (15, 1, 4, 4)
    assert synset.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert synset.meta["method"] == method and synset.meta["seed"] == 0
    assert synset.meta["dataset"] == real.meta()
    assert synset.meta["config"]["images_per_class"] == 5
    rows = torch.tensor(synset.meta["source_indices"])
    assert len(set(rows.tolist())) == 15  # no duplicates
    assert torch.equal(real.train_labels[rows], synset.labels)  # each row belongs to its class
    assert torch.equal(real.train_images[rows], synset.images)  # the images are those real rows


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_with_the_seed(method):
    real = _real()
    first = _pick(method, real, 4, seed=3).meta["source_indices"]
    assert _pick(method, real, 4, seed=3).meta["source_indices"] == first


def test_random_draws_what_realset_sample_draws():
    real = _real()
    synset = select_random(real, 6, seed=7)
    g = generator(7, "coreset-random")
    expected = torch.cat([real.sample(c, 6, g) for c in range(real.num_classes)])
    assert torch.equal(synset.images, expected)
    assert select_random(real, 6, seed=8).meta["source_indices"] != synset.meta["source_indices"]


@pytest.mark.parametrize("method", METHODS)
def test_too_few_images_in_a_class_is_a_clear_error(method):
    with pytest.raises(ValueError, match="class .* has 30"):
        _pick(method, _real(per_class=30), 31)


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="unknown coreset method"):
        select("forgetting", _real(), 1)


def test_herding_mean_is_closer_to_the_class_mean_than_random():
    real = _real(per_class=60, size=5)
    herding = select_herding(real, 5, model=FlattenEmbed())

    def mean_gap(synset) -> float:
        gaps = [(synset.of_class(c).flatten(1).mean(0) - real.train_images[real.train_labels == c].flatten(1)
                 .mean(0)).norm() for c in range(real.num_classes)]
        return float(torch.stack(gaps).mean())

    random_gaps = [mean_gap(select_random(real, 5, seed=s)) for s in range(10)]
    assert mean_gap(herding) < 0.5 * sum(random_gaps) / len(random_gaps)


def test_kcenter_spreads_over_two_clusters():
    # One class of 2-D points: a big tight cluster at the origin and a small one far away. A random pick
    # of 2 usually stays in the big cluster; k-center starts near the mean and then jumps to the far one.
    g = torch.Generator().manual_seed(0)
    near = torch.randn(40, 2, generator=g) * 0.05
    far = torch.randn(4, 2, generator=g) * 0.05 + torch.tensor([10.0, 10.0])
    points = torch.cat([near, far]).view(-1, 2, 1, 1)  # two channels of 1x1 "images"
    labels = torch.zeros(len(points), dtype=torch.int64)
    real = from_tensors("clusters", points, labels, points[:1], labels[:1], mean=0.0, std=1.0)
    rows = select_kcenter(real, 2, model=FlattenEmbed()).meta["source_indices"]
    assert sorted(r >= 40 for r in rows) == [False, True]
    # The first pick is the point nearest the mean (deterministic), which lies in the big cluster.
    assert rows[0] < 40


def test_herding_and_kcenter_with_a_registered_network():
    pytest.importorskip("ddlib.models")
    real = _real(num_classes=2, per_class=12, size=16)
    for method in ("herding", "kcenter"):
        synset = select(method, real, 3, model="convnet", seed=1, batch_size=8)
        assert synset.meta["config"]["model"] == "convnet"
        assert synset.meta["config"]["feature_dim"] == 128 * 2 * 2
        assert synset.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_synset_round_trips_through_a_file(tmp_path):
    synset = _pick("herding", _real(), 2)
    loaded = type(synset).load(synset.save(tmp_path / "coreset.pt"))
    assert loaded.meta["source_indices"] == synset.meta["source_indices"]
