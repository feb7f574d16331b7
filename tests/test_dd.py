"""DD: positive learned rates, the unroll, replay from the fixed init, reproducibility."""
from __future__ import annotations

import pytest
import torch

from ddlib.data import load_dataset
from ddlib.methods import distill, get_method, make_config
from ddlib.methods.dd import replay, unroll, xavier_init
from ddlib.models import get_network
from ddlib.rng import generator


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", image_size=8)


def test_xavier_init_statistics():
    net = get_network("lenet", 1, 10, 28)
    params = xavier_init(net, 1.0, generator(0))
    w = params["classifier.weight"]  # [10, 84]
    assert w.std().item() == pytest.approx((2 / 94) ** 0.5, rel=0.15)
    assert all(params[k].abs().sum() == 0 for k in params if k.endswith("bias"))
    assert torch.equal(xavier_init(net, 1.0, generator(0))["classifier.weight"], w)


def test_unroll_is_plain_gradient_descent():
    net = get_network("mlp", 1, 3, 4, seed=0)
    params = {k: p.detach().clone() for k, p in net.named_parameters()}
    blocks = torch.randn(2, 3, 1, 4, 4, generator=generator(1))
    lrs = torch.tensor([0.1, 0.2, 0.3])
    out = unroll(net, params, blocks, lrs)
    opt_net = get_network("mlp", 1, 3, 4, seed=0)
    for t, rate in enumerate(lrs.tolist()):
        opt_net.zero_grad()
        torch.nn.functional.cross_entropy(opt_net(blocks[t % 2]), torch.arange(3)).backward()
        with torch.no_grad():
            for p in opt_net.parameters():
                p -= rate * p.grad
    for name, p in opt_net.named_parameters():
        assert torch.allclose(out[name], p, atol=1e-6)


def test_learned_rates_stay_positive_even_when_pushed_down(digits):
    cfg = make_config("dd", ipc=2, epochs=1, batch_real=4, lr_img=5.0, lr_init=1e-3)
    d = get_method("dd")(digits, cfg, seed=0)
    for it in range(5):
        d.step(it)
    assert d.lrs.shape == (2,) and bool((d.lrs > 0).all())


def test_distill_lowers_the_loss_and_replays(digits):
    kw = dict(ipc=2, epochs=2, iterations=30, batch_real=10, lr_img=0.05, model="lenet", show_progress=False,
              seed=0, device="cpu", log_every=5)
    synset = distill("dd", digits, **kw)
    loss = synset.meta["history"]["loss"]
    assert loss[-1] < loss[0]
    assert len(synset.meta["dd"]["lrs"]) == 4 and min(synset.meta["dd"]["lrs"]) > 0
    fixed = replay(synset, digits)
    assert len(fixed.accuracies) == 1 and 0.0 <= fixed.accuracy_mean <= 1.0
    again = replay(synset, digits)
    assert fixed.accuracies == again.accuracies  # the fixed init is rebuilt exactly
    fresh = replay(synset, digits, fixed_init=False, num_eval=2)
    assert len(fresh.accuracies) == 2 and fresh.protocol["fixed_init"] is False
    assert torch.equal(synset.images, distill("dd", digits, **kw).images)


def test_cli_reports_the_replay(tmp_path):
    import json

    from ddlib.cli import main

    out = tmp_path / "dd"
    code = main(["distill", "--method", "dd", "--dataset", "digits", "--image-size", "8", "--ipc", "2",
                 "--iterations", "2", "--batch-real", "4", "--set", "epochs=1", "--set", "fixed_init=false",
                 "--num-eval", "1", "--eval-epochs", "1", "--no-random-baseline", "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "replay_accuracy_mean" in metrics and "accuracy_mean" in metrics
    assert metrics["config"]["fixed_init"] is False
