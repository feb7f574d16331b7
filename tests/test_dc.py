"""DC/DSA: the loop table, per-class gradients, the distances, the Hessian term and one update."""
from __future__ import annotations

import pytest
import torch

from ddlib.cli import main
from ddlib.data import load_dataset
from ddlib.methods import distill, get_method, make_config
from ddlib.methods.dc import class_gradients, class_hvps, gradient_distance, loops_for, rademacher_like
from ddlib.models import get_network
from ddlib.rng import generator
from ddlib.synset import SyntheticSet


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", image_size=8)


def _batch(k: int, n: int, size: int, seed: int = 1, dtype=torch.float32):
    x = torch.randn(k, n, 1, size, size, generator=generator(seed), dtype=dtype)
    y = torch.arange(k)[:, None].expand(-1, n)
    return x, y


def test_loops_table_and_rule():
    assert [loops_for(i) for i in (1, 10, 20, 30, 40, 50)] == [(1, 1), (10, 50), (20, 25), (30, 20), (40, 15),
                                                              (50, 10)]
    assert loops_for(5) == (5, 50) and loops_for(15) == (15, 38) and loops_for(100) == (50, 10)
    with pytest.raises(ValueError, match=">= 1"):
        loops_for(0)


def test_batched_chunked_and_looped_class_gradients_agree():
    net = get_network("convnet", 1, 4, 8, seed=0)
    x, y = _batch(4, 6, 8)
    batched = class_gradients(net, x, y)
    looped = class_gradients(net, x, y, batched=False)
    chunked = class_gradients(net, x, y, chunk=4)  # slices of 4 and 2 images per class
    net.zero_grad()
    torch.nn.functional.cross_entropy(net(x[2]), y[2]).backward()  # plain autograd, class 2
    for name, p in net.named_parameters():
        assert batched[name].shape == (4, *p.shape)
        assert torch.allclose(batched[name][2], p.grad, atol=1e-6)
        assert torch.allclose(looped[name], batched[name], atol=1e-6)
        assert torch.allclose(chunked[name], batched[name], atol=1e-6)


def test_layerwise_distance_by_hand():
    # One "conv" weight [K=1, out=2, in=1, 1, 2] and a bias [K=1, 2]: the bias adds nothing.
    a = {"w": torch.tensor([[[[[1.0, 0.0]]], [[[1.0, 1.0]]]]]), "b": torch.tensor([[5.0, -5.0]])}
    b = {"w": torch.tensor([[[[[0.0, 2.0]]], [[[2.0, 2.0]]]]]), "b": torch.tensor([[0.0, 1.0]])}
    # rows: (1,0).(0,2) -> cos 0 -> 1; (1,1).(2,2) -> cos 1 -> ~0
    assert gradient_distance(a, b).item() == pytest.approx(1.0, abs=1e-5)
    assert gradient_distance(a, a).item() == pytest.approx(0.0, abs=1e-5)
    mse = gradient_distance(a, b, "mse").item()
    assert mse == pytest.approx(1 + 4 + 1 + 1 + 25 + 36)
    cos = gradient_distance(a, b, "cos").item()
    va, vb = torch.tensor([1.0, 0, 1, 1, 5, -5]), torch.tensor([0.0, 2, 2, 2, 0, 1])
    assert cos == pytest.approx(1 - (va @ vb / (va.norm() * vb.norm())).item(), abs=1e-5)
    with pytest.raises(ValueError, match="unknown distance"):
        gradient_distance(a, b, "l1")


def test_layerwise_distance_is_zero_for_identical_gradients():
    # DC's 1e-6 in the denominator makes rows of near-zero gradient count ~1 (as in the official code),
    # so use a net whose gradient rows are all clearly non-zero.
    net = get_network("convnet", 1, 4, 16, seed=0, width=16, depth=2)
    g = class_gradients(net, *_batch(4, 3, 16))
    assert gradient_distance(g, g).item() == pytest.approx(0.0, abs=0.05)
    other = class_gradients(net, *_batch(4, 3, 16, seed=2))
    assert gradient_distance(g, other).item() > 1.0


def test_hessian_vector_products_match_finite_differences():
    # Smooth activations and float64, so the central difference is accurate (ReLU kinks are not).
    net = get_network("convnet", 1, 3, 8, seed=0, act="sigmoid", depth=2).double()
    x, y = _batch(3, 4, 8, dtype=torch.float64)
    params = {k: p.detach() for k, p in net.named_parameters()}
    v = rademacher_like(params, generator(3))
    hvp = class_hvps(net, x, y, v)
    eps = 1e-6

    def grads_at(sign: float):
        moved = get_network("convnet", 1, 3, 8, seed=0, act="sigmoid", depth=2).double()
        with torch.no_grad():
            for name, p in moved.named_parameters():
                p.copy_(params[name] + sign * eps * v[name])
        return class_gradients(moved, x, y)

    plus, minus = grads_at(1.0), grads_at(-1.0)
    for name in hvp:
        estimate = (plus[name] - minus[name]) / (2 * eps)
        # conv biases before a norm have zero gradient: their estimate is pure rounding noise (~1e-10)
        assert (hvp[name] - estimate).norm() <= 1e-4 * estimate.norm() + 1e-8, name
    looped = class_hvps(net, x, y, v, batched=False, chunk=3)  # double backward, in chunks of 3 images
    for name in hvp:
        assert torch.allclose(looped[name], hvp[name], rtol=1e-7, atol=1e-10), name


def test_looped_and_batched_hvps_give_the_same_image_gradients():
    net = get_network("convnet", 1, 3, 8, seed=0, act="sigmoid", depth=2).double()
    x, y = _batch(3, 4, 8, dtype=torch.float64)
    v = rademacher_like({k: p.detach() for k, p in net.named_parameters()}, generator(4))
    image_grads = []
    for batched in (True, False):
        xs = x.clone().requires_grad_(True)
        h = class_hvps(net, xs, y, v, batched=batched)
        image_grads.append(torch.autograd.grad(sum((t * t).sum() for t in h.values()), xs)[0])
    assert torch.allclose(*image_grads, rtol=1e-6, atol=1e-12)


def test_synthetic_gradients_are_differentiable_wrt_the_images():
    net = get_network("convnet", 1, 4, 8, seed=0)
    x, y = _batch(4, 2, 8)
    xs = x.clone().requires_grad_(True)
    real = class_gradients(net, *_batch(4, 5, 8, seed=3))
    gradient_distance(class_gradients(net, xs, y), real).backward()
    assert xs.grad is not None and xs.grad.abs().sum() > 0


@pytest.mark.parametrize("model", ["convnet", "convnetbn", "mlp"])
def test_one_update_lowers_the_matching_loss_on_a_fixed_network(digits, model):
    cfg = make_config("dc", ipc=2, batch_real=16, lr_img=0.01 if model == "mlp" else 0.1, model=model)
    d = get_method("dc")(digits, cfg, seed=0)
    d.freeze_batchnorm(0, 0)
    real_x = digits.sample_per_class(16, generator(2))
    before = d.matching_loss(real_x, d.per_class(d.images), generator(0))["loss"]
    d.update_images(before)
    after = d.matching_loss(real_x, d.per_class(d.images), generator(0))["loss"]
    assert after.item() < before.item()


def test_hessian_term_is_added_and_recorded(digits):
    cfg = make_config("dc", ipc=1, batch_real=4, hessian_weight=0.5, hessian_probes=2)
    d = get_method("dc")(digits, cfg, seed=0)
    parts = d.matching_loss(digits.sample_per_class(4, generator(2)), d.per_class(d.images), generator(0))
    assert parts["hvp_distance"].item() > 0
    assert parts["loss"].item() == pytest.approx(parts["grad_distance"].item() + 0.5 * parts["hvp_distance"].item(),
                                                 rel=1e-5)


def test_configs_and_presets():
    dc, dsa = make_config("dc"), make_config("dsa")
    assert (dc.lr_img, dc.init, dc.dsa, dc.distance, dc.batch_real, dc.lr_net) == (0.1, "noise", False, "layerwise",
                                                                                  256, 0.01)
    assert (dsa.dsa, dsa.init) == (True, "real")
    course = make_config("dc", preset="course")
    assert (course.iterations, course.outer_loop, course.inner_loop, course.ipc) == (100, 10, 50, 10)
    with pytest.raises(ValueError, match="unknown distance"):
        get_method("dc")(load_dataset("digits", image_size=8), make_config("dc", distance="l2"))


@pytest.mark.parametrize("method", ["dc", "dsa"])
def test_distill_is_reproducible_and_beats_its_start(digits, method):
    kw = dict(ipc=2, iterations=2, batch_real=8, outer_loop=2, inner_loop=2, show_progress=False, seed=3,
              device="cpu")
    a, b = distill(method, digits, **kw), distill(method, digits, **kw)
    assert isinstance(a, SyntheticSet) and torch.equal(a.images, b.images)
    assert a.meta["method"] == method and len(a.meta["history"]["loss"]) == 1
    assert a.meta["config"]["outer_loop"] == 2


def test_cli_dc_flags(tmp_path):
    out = tmp_path / "run"
    code = main(["distill", "--method", "dc", "--dataset", "digits", "--image-size", "8", "--ipc", "1",
                 "--iterations", "1", "--batch-real", "4", "--distance", "mse", "--hessian-weight", "0.1",
                 "--hessian-probes", "1", "--no-eval", "--out", str(out)])
    assert code == 0
    cfg = SyntheticSet.load(out / "synset.pt").meta["config"]
    assert (cfg["distance"], cfg["hessian_weight"], cfg["hessian_probes"]) == ("mse", 0.1, 1)
