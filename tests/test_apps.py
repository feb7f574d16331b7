"""Applications: class-incremental continual learning and NAS with a proxy set (digits at 8 px, tiny budgets)."""
from __future__ import annotations

import pytest
import torch

import ddlib.apps.continual as continual_module
from ddlib.apps import (
    class_order,
    class_steps,
    compare_memories,
    continual_learning,
    convnet_grid,
    search,
    spearman,
    validation_split,
)
from ddlib.data import from_tensors, load_dataset
from ddlib.evaluate import get_protocol
from ddlib.methods.coreset import select_random
from ddlib.models import get_network
from ddlib.synset import SyntheticSet

TINY = get_protocol("dc", epochs=10, augment="none")
SMALL_NET = {"width": 8, "depth": 2}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", image_size=8)


@pytest.fixture(scope="module")
def memory(digits):
    return select_random(digits, 5, seed=0)


# ---------------------------------------------------------------------------------------------- continual learning
def test_class_steps_partition_the_classes():
    assert class_steps(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert class_steps(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    order = class_order(10, seed=3)
    steps = class_steps(10, 2, order)
    assert [c for step in steps for c in step] == order and sorted(order) == list(range(10))
    assert class_order(10, seed=3) == order                 # seeded, not global RNG
    with pytest.raises(ValueError):
        class_steps(10, 11)
    with pytest.raises(ValueError):
        class_steps(3, 1, order=[0, 0, 1])


def test_continual_learning_grows_memory_and_tests_seen_classes(digits, memory, monkeypatch):
    tested = []
    real_test_network = continual_module.test_network

    def spy(net, images, labels, batch_size=1024):
        tested.append(sorted(labels.unique().tolist()))
        return real_test_network(net, images, labels, batch_size)

    monkeypatch.setattr(continual_module, "test_network", spy)
    protocol = get_protocol("dc", epochs=20, augment="none")
    result = continual_learning(memory, digits, num_steps=5, protocol=protocol, model_overrides=SMALL_NET)
    assert len(result.accuracies) == 5 and all(0.0 <= a <= 1.0 for a in result.accuracies)
    assert tested[0] == [0, 1] and tested[-1] == list(range(10))
    assert [len(c) for c in result.classes_seen] == [2, 4, 6, 8, 10]
    assert result.memory_sizes == [10, 20, 30, 40, 50]      # 5 exemplars per seen class
    expected_tests = [int(torch.isin(digits.test_labels, torch.arange(2 * (s + 1))).sum()) for s in range(5)]
    assert result.test_sizes == expected_tests and result.test_sizes[-1] == len(digits.test_labels)
    # two classes after 20 epochs on 10 clean digits: far above chance over all 10 outputs; ten are harder
    assert result.accuracies[0] > 0.6 and result.accuracies[0] > result.accuracies[-1]


def test_continual_learning_is_reproducible_and_caps_exemplars(digits, memory):
    kwargs = {"num_steps": 2, "protocol": TINY, "model_overrides": SMALL_NET, "seed": 1, "images_per_class": 2}
    first, second = continual_learning(memory, digits, **kwargs), continual_learning(memory, digits, **kwargs)
    assert first.runs == second.runs
    assert first.memory_sizes == [10, 20]


def test_compare_memories_table(digits, memory):
    noise = SyntheticSet(torch.randn_like(memory.images), memory.labels.clone(), meta={"dataset": digits.meta()})
    table = compare_memories({"random": memory, "noise": noise}, digits, num_steps=2, protocol=TINY,
                             model_overrides=SMALL_NET)
    assert table.shape[0] == 4 and list(table["memory"]) == ["random", "random", "noise", "noise"]
    assert {"step", "classes_seen", "accuracy_mean", "accuracy_std", "memory_images"} <= set(table.columns)
    assert list(table["classes_seen"]) == [5, 10, 5, 10]


# ---------------------------------------------------------------------------------------------- NAS
def test_convnet_grid_is_large_distinct_and_buildable():
    grid = convnet_grid()
    assert len(grid) >= 24 and len({c["name"] for c in grid}) == len(grid)
    assert len({tuple(sorted((k, v) for k, v in c.items() if k != "name")) for c in grid}) == len(grid)
    for candidate in (grid[0], grid[-1]):
        overrides = {k: v for k, v in candidate.items() if k != "name"}
        net = get_network("convnet", 1, 10, 8, seed=0, **overrides)
        assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    limited = convnet_grid(limit=10, seed=0)
    assert len(limited) == 10 and limited == convnet_grid(limit=10, seed=0)
    assert {c["name"] for c in limited} <= {c["name"] for c in grid}


def test_validation_split_is_stratified_disjoint_and_never_uses_test():
    # every image is a constant equal to its id: train ids 0..199 (20 per class), test ids 1000+
    train_y = torch.arange(10).repeat_interleave(20)
    train_x = torch.arange(200, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 4, 4) / 2000
    test_x = (torch.arange(30, dtype=torch.float32) + 1000).view(-1, 1, 1, 1).expand(-1, 1, 4, 4) / 2000
    real = from_tensors("toy", train_x, train_y, test_x, torch.arange(10).repeat(3), mean=0.0, std=1.0)

    def ids(x):
        return set((x[:, 0, 0, 0] * 2000).round().long().tolist())

    train_part, val = validation_split(real, fraction=0.1, seed=0)
    assert torch.bincount(val.test_labels, minlength=10).tolist() == [2] * 10       # stratified
    assert torch.bincount(train_part.train_labels, minlength=10).tolist() == [18] * 10
    assert ids(val.test_images).isdisjoint(ids(train_part.train_images))
    assert ids(val.test_images) | ids(train_part.train_images) == set(range(200))    # all from training data
    assert len(train_part.test_labels) == 0 and torch.equal(val.train_images, train_part.train_images)
    assert (val.mean, val.std, val.name) == (real.mean, real.std, real.name)        # normalisation kept
    assert ids(validation_split(real, 0.1, seed=1)[1].test_images) != ids(val.test_images)


def test_spearman_hand_case_and_extremes():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks a = 1, 2.5, 2.5, 4; b = 1, 3, 2, 4 -> Pearson of ranks = 4.5 / sqrt(4.5 * 5)
    assert spearman([0.1, 0.5, 0.5, 0.9], [1, 3, 2, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 5, (30,), generator=g).tolist(), torch.rand(30, generator=g).tolist()
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic)


def test_search_ranks_three_candidates_on_validation(digits):
    train_part, val = validation_split(digits, fraction=0.1, seed=0)
    candidates = convnet_grid(depths=(1, 2), widths=(8,), acts=("relu", "sigmoid"), norms=("instance",),
                              pools=("avg",), limit=3)
    proxy = select_random(train_part, 5, seed=0)
    result = search(candidates, proxy, val, proxy_protocol=TINY, real_protocol=TINY, real_subset=200)
    assert result.table.shape[0] == 3 and list(result.table["name"]) == [c["name"] for c in candidates]
    assert -1.0 <= result.spearman <= 1.0
    assert result.best_proxy in set(result.table["name"]) and result.best_real in set(result.table["name"])
    assert result.proxy_seconds > 0 and result.real_seconds > 0 and 0.0 <= result.top_k_overlap <= 1.0
    assert result.table[["proxy_accuracy", "real_accuracy"]].stack().between(0, 1).all()
    with pytest.raises(ValueError, match="validation"):
        search(candidates, proxy, digits, proxy_protocol=TINY, real_protocol=TINY)  # the test set: refused
