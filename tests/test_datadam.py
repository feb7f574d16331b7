"""DataDAM: attention maps, the loss pieces, presets, determinism, chunked real statistics and the CLI."""
from __future__ import annotations

import math

import pytest
import torch

from ddlib.cli import main
from ddlib.data import load_dataset
from ddlib.methods import distill, make_config
from ddlib.methods.datadam import DataDAM, _real_statistics, attention_map, class_means, mmd_loss, sam_loss
from ddlib.models import get_network
from ddlib.rng import generator
from ddlib.synset import SyntheticSet


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", image_size=8)


def _distiller(digits, **overrides) -> DataDAM:
    cfg = make_config("datadam", **{"ipc": 2, "batch_real": 8, "dsa": False, **overrides})
    return DataDAM(digits, cfg, seed=0, device="cpu")


def test_attention_map_shape_unit_rows_and_power():
    x = torch.randn(5, 3, 4, 6, generator=generator(0))
    a = attention_map(x, 4.0)
    assert a.shape == (5, 24)
    assert torch.allclose(a.norm(dim=1), torch.ones(5))
    assert torch.allclose(attention_map(3 * x, 4.0), a, atol=1e-6)  # the scale of F does not matter

    # Hand-made [1, 2, 2, 2] map: per-pixel |F| of the two channels (1, 1), (2, 0), (0, 0), (0, -1).
    f = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, -1.0]]]])
    p1 = torch.tensor([2.0, 2.0, 0.0, 1.0]) / 3.0                 # sum |F|   = 2, 2, 0, 1
    p4 = torch.tensor([2.0, 16.0, 0.0, 1.0]) / math.sqrt(261.0)  # sum |F|^4 = 2, 16, 0, 1
    assert torch.allclose(attention_map(f, 1.0)[0], p1)
    assert torch.allclose(attention_map(f, 4.0)[0], p4)
    # A higher power concentrates the attention on the strongest pixel.
    assert attention_map(f, 4.0)[0].argmax() == 1 and attention_map(f, 4.0)[0, 1] > attention_map(f, 1.0)[0, 1]


def test_loss_pieces():
    real, syn = torch.zeros(2, 3), torch.ones(2, 3)
    assert mmd_loss(real, syn, 0.01).item() == pytest.approx(6.0)  # 100 * 0.01 * 6
    assert sam_loss([real, real], [syn, real]).item() == pytest.approx(600.0)  # 100 per layer
    x = torch.arange(12.0).view(4, 3)  # 2 classes x 2 images
    assert torch.equal(class_means(x, 2), torch.tensor([[1.5, 2.5, 3.5], [7.5, 8.5, 9.5]]))


def test_sam_and_mmd_are_zero_when_synthetic_equals_real(digits):
    d = _distiller(digits, chunk=10_000)
    real_x = digits.sample_per_class(6, generator(1))
    loss, sam, mmd = d.loss(d.net, real_x, real_x.clone())
    assert sam.item() == 0.0 and mmd.item() == 0.0 and loss.item() == 0.0
    _, sam, mmd = d.loss(d.net, real_x, d.per_class(d.images))
    assert sam.item() > 0 and mmd.item() > 0


def test_one_step_lowers_the_loss_on_a_fixed_network(digits):
    d = _distiller(digits, lr_img=0.1)
    real_x = digits.sample_per_class(16, generator(2))
    before = d.loss(d.net, real_x, d.per_class(d.images))[0]
    d.update_images(before)
    after = d.loss(d.net, real_x, d.per_class(d.images))[0]
    assert after.item() < before.item()


def test_presets_and_overrides():
    course = make_config("datadam", preset="course")
    assert (course.iterations, course.lr_img, course.batch_real, course.ipc, course.mmd_weight,
            course.momentum_img, course.power, course.norm) == (100, 0.1, 256, 10, 0.01, 0.5, 4.0, "instance")
    paper = make_config("datadam", preset="paper")
    assert (paper.iterations, paper.lr_img, paper.mmd_weight, paper.power, paper.norm) == (8000, 1.0, 0.01, 4.0,
                                                                                           "instance")
    released = make_config("datadam", preset="released")
    assert (released.iterations, released.power, released.norm, released.batch_real) == (20000, 1.0, "batch", 64)
    mhist = make_config("datadam", preset="course", iterations=200, batch_real=128, lr_img=None)
    assert (mhist.iterations, mhist.batch_real, mhist.lr_img) == (200, 128, 0.1)  # None leaves the preset's
    assert make_config("datadam").power == 4.0 and make_config("datadam").norm == "instance"


def test_norm_must_agree_with_the_model(digits):
    assert _distiller(digits, norm="batch").net.has_batchnorm
    assert not _distiller(digits).net.has_batchnorm
    with pytest.raises(ValueError, match="fixes norm"):
        _distiller(digits, model="convnetbn")
    assert _distiller(digits, model="convnetbn", norm="batch").net.has_batchnorm
    _distiller(digits, model="mlp")  # no norm setting: built as it is while norm stays the default
    with pytest.raises(ValueError, match="no norm setting"):
        _distiller(digits, model="mlp", norm="batch")


def test_same_seed_gives_identical_bytes(digits):
    kw = dict(ipc=1, iterations=2, batch_real=8, seed=3, device="cpu", show_progress=False, log_every=1)
    a, b = distill("datadam", digits, **kw), distill("datadam", digits, **kw)
    assert a.images.numpy().tobytes() == b.images.numpy().tobytes()
    assert not torch.equal(a.images, distill("datadam", digits, **{**kw, "seed": 4}).images)
    history = a.meta["history"]
    assert a.meta["method"] == "datadam" and len(history["loss"]) == 2
    assert history["loss"][0] == pytest.approx(history["sam"][0] + history["mmd"][0], rel=1e-5)


def test_chunked_real_statistics_equal_the_whole_batch(digits):
    x = digits.sample_per_class(6, generator(5)).flatten(0, 1)  # [60, 1, 8, 8]
    net = get_network("convnet", 1, 10, 8, seed=1, norm="instance")
    whole_maps, whole_mean = _real_statistics(net, x, 10, 10_000, 4.0)
    maps, mean = _real_statistics(net, x, 10, 7, 4.0)  # chunks that straddle class boundaries
    assert len(maps) == len(whole_maps) == 2  # every block but the last
    assert [m.shape for m in maps] == [(10, 64), (10, 16)] and mean.shape == whole_mean.shape
    for m, w in zip(maps, whole_maps):
        assert torch.allclose(m, w, atol=1e-6)
    assert torch.allclose(mean, whole_mean, atol=1e-5)


def test_cli_flags_reach_the_config(tmp_path):
    out = tmp_path / "run"
    code = main(["distill", "--method", "datadam", "--preset", "course", "--power", "1", "--mmd-weight", "0.02",
                 "--norm", "batch", "--dataset", "digits", "--image-size", "8", "--ipc", "1", "--iterations", "2",
                 "--batch-real", "8", "--num-eval", "1", "--eval-epochs", "2", "--no-random-baseline",
                 "--device", "cpu", "--out", str(out)])
    assert code == 0
    config = SyntheticSet.load(out / "synset.pt").meta["config"]
    assert (config["power"], config["mmd_weight"], config["norm"]) == (1.0, 0.02, "batch")
    assert (config["iterations"], config["lr_img"], config["batch_real"]) == (2, 0.1, 8)  # flags over the preset
