"""The evaluation protocol: presets, the training loop's schedule, soft labels, reproducibility."""
from __future__ import annotations

import pytest
import torch

from ddlib.data import load_dataset
from ddlib.evaluate import (
    PROTOCOLS,
    DatasetMismatchError,
    _loss,
    evaluate,
    evaluate_synset,
    get_protocol,
    reusable_full_data,
    train_network,
)
from ddlib.methods.coreset import select_random
from ddlib.models import get_network
from ddlib.rng import generator


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", image_size=8)


def test_presets():
    dc, course = PROTOCOLS["dc"], PROTOCOLS["course"]
    assert (dc.epochs, dc.lr, dc.momentum, dc.weight_decay) == (1000, 0.01, 0.9, 5e-4)
    assert (dc.schedule, dc.augment) == ("step", "dsa")
    assert (course.epochs, course.lr, course.schedule, course.extra_epoch) == (20, 0.01, "cosine", False)
    assert get_protocol("dc", epochs=300, lr=None).epochs == 300
    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocol("nope")


def test_soft_label_loss_matches_hard_for_one_hot_limit():
    logits = torch.randn(5, 3)
    hard = torch.tensor([0, 1, 2, 1, 0])
    soft = torch.nn.functional.one_hot(hard, 3).float() * 100.0  # softmax of these is one-hot
    assert torch.allclose(_loss(logits, soft), _loss(logits, hard), atol=1e-4)


def test_step_schedule_decays_once_with_fresh_optimiser(digits):
    net = get_network("convnet", 1, 10, 8, seed=0, width=8, depth=1)
    seen = []
    orig = torch.optim.SGD.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return orig(self, *a, **k)

    torch.optim.SGD.step = spy
    try:
        x, y = digits.train_images[:20], digits.train_labels[:20]
        train_network(net, x, y, get_protocol("dc", epochs=6, augment="none", batch_size=20), rng=generator(0))
    finally:
        torch.optim.SGD.step = orig
    # 7 passes (epochs + 1); the lr drops after pass index epochs//2 + 1 = 4, as the official loop
    assert seen == [0.01] * 5 + [pytest.approx(0.001)] * 2


def test_evaluate_is_reproducible_and_learns(digits):
    subset = select_random(digits, 5, seed=0)
    kw = dict(model="convnet", protocol=get_protocol("dc", epochs=30), num_eval=2, seed=3)
    a = evaluate(subset.images, subset.labels, digits, **kw)
    b = evaluate(subset.images, subset.labels, digits, **kw)
    assert a.accuracies == b.accuracies
    assert a.accuracy_mean > 0.3  # 50 real digits at 8 px, 30 epochs: far above the 10 % of chance
    assert a.flops_per_image > 0 and a.train_flops > a.flops_per_image
    summary = a.summary()
    assert 0 <= summary["accuracy_mean"] <= 1 and summary["num_eval"] == 2


def test_mismatched_dataset_is_refused(digits):
    other = load_dataset("digits", image_size=16)
    subset = select_random(digits, 1, seed=0)
    with pytest.raises(DatasetMismatchError, match="image_size"):
        evaluate_synset(subset, other, protocol=get_protocol("dc", epochs=1), num_eval=1)


def test_training_in_bf16_keeps_fp32_weights_and_follows_fp32(digits):
    """``precision="bf16"`` autocasts the passes only: the weights stay fp32 and end close to fp32 training's."""
    x, y = digits.train_images[:40], digits.train_labels[:40]
    protocol = get_protocol("dc", epochs=10, augment="none", batch_size=20)
    nets = {p: get_network("convnet", 1, 10, 8, seed=0, width=8, depth=1) for p in ("fp32", "bf16")}
    start = [w.detach().clone() for w in nets["fp32"].parameters()]
    for precision, net in nets.items():
        train_network(net, x, y, protocol, rng=generator(0), precision=precision)
    aparts = []
    for w0, w32, w16 in zip(start, nets["fp32"].parameters(), nets["bf16"].parameters()):
        assert w16.dtype == torch.float32
        moved, apart = (w32 - w0).norm(), (w16 - w32).norm()
        assert moved > 0 and apart < 0.1 * moved  # bf16 rounding, not a different training
        aparts.append(apart)
    assert max(aparts) > 0  # the passes did run in bf16


def test_a_stored_full_data_summary_is_reused_only_when_it_matches():
    stored = {"model": "convnet", "num_train_images": 60000, "accuracy_mean": 0.98,
              "protocol": {"name": "course", "epochs": 20}}
    ask = dict(model="convnet", num_train_images=60000, protocol="course", min_epochs=20)
    assert reusable_full_data(stored, **ask) == (True, "course protocol, 20 epochs")
    reuse, why = reusable_full_data(stored, **{**ask, "min_epochs": 21})
    assert not reuse and "20 epochs, fewer than the 21" in why
    reuse, why = reusable_full_data(stored, **{**ask, "num_train_images": 10000})
    assert not reuse and "training images is 60000, not 10000" in why
    # a hand-written summary without a protocol entry is retrained, not a KeyError
    reuse, why = reusable_full_data({"model": "convnet", "num_train_images": 60000, "accuracy_mean": 0.98}, **ask)
    assert not reuse and "protocol is None" in why
