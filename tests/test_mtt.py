"""MTT, DATM and PAD: the unrolled student, the positive learned lr, the window, soft labels, the
parameter filter, and runs that give sets ddlib.evaluate can use (on tiny experts)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ddlib.data import load_dataset
from ddlib.evaluate import evaluate_synset
from ddlib.methods import distill, get_method, make_config
from ddlib.methods.datm import soft_cross_entropy
from ddlib.methods.mtt import positive_lr, raw_for_lr
from ddlib.models import get_network
from ddlib.rng import generator
from ddlib.synset import SyntheticSet
from ddlib.trajectory import ExpertConfig, FlatModel, train_experts

MODEL = "convnetw16"
WINDOW = dict(syn_steps=3, expert_epochs=1, max_start_epoch=3, batch_syn=10, log_every=1)
DATM_WINDOW = dict(WINDOW, current_max_start_epoch=2, expansion_end_epoch=4)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", image_size=8)


@pytest.fixture(scope="module")
def experts(digits, tmp_path_factory):
    cfg = ExpertConfig(num_experts=2, epochs=3, model=MODEL, subset=10, batch_size=32)
    return str(train_experts(digits, cfg, tmp_path_factory.mktemp("experts"), seed=0, show_progress=False))


def build(method, digits, experts, **kw):
    window = WINDOW if method == "mtt" else DATM_WINDOW
    cfg = make_config(method, **{**dict(experts=experts, model=MODEL, ipc=2, iterations=3), **window, **kw})
    return get_method(method)(digits, cfg, seed=0)


def test_learned_lr_is_positive_by_construction():
    for lr in (1e-5, 1e-3, 0.01, 0.5):
        assert positive_lr(torch.tensor(raw_for_lr(lr, 1e-4)), 1e-4).item() == pytest.approx(lr, rel=1e-5)
    assert 0 < positive_lr(torch.tensor(-5e-4), 1e-4).item() < 1e-6  # a raw value pushed below zero
    raw = torch.tensor(raw_for_lr(0.01, 1e-4), requires_grad=True)
    positive_lr(raw, 1e-4).backward()
    assert raw.grad.item() == pytest.approx(1.0)  # moves like the official raw lr well above the floor


def test_one_unrolled_step_is_a_manual_sgd_step(digits, experts):
    d = build("mtt", digits, experts, syn_steps=1, batch_syn=0, dsa=False)
    start = d.experts[0][1].float()
    student = d.unroll(start, generator(0))
    net = get_network(MODEL, 1, 10, 8)
    FlatModel(net).load_into(start)
    F.cross_entropy(net(d.images.detach()), d.labels).backward()
    lr = d.lr.item()
    expected = torch.cat([(p - lr * p.grad).reshape(-1) for p in net.parameters()])
    assert torch.allclose(student.detach(), expected, atol=1e-6)
    assert student.requires_grad  # differentiable w.r.t. the images and the lr


@pytest.mark.parametrize("method", ["mtt", "datm"])
def test_student_steps_in_slices_equal_whole_batch_steps(digits, experts, method):
    """The unrolled student and the gradients it sends to the images, labels and lr do not depend on how each
    student batch is sliced into passes (``chunk``): 20 images as one pass, as 7 + 7 + 6, as 20 ones."""
    results = []
    for chunk in (20, 7, 1):
        d = build(method, digits, experts, syn_steps=2, batch_syn=0, chunk=chunk)
        start = d.experts[0][1].float()
        student = d.unroll(start, generator(0))
        learnables = [t for _, t in d.learnables()]
        results.append([student, *torch.autograd.grad(d.matching_loss(student, start, d.experts[0][2].float()),
                                                      learnables)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * a.abs().max().item())  # fp32 rounding


def matching_loss_and_grads(d):
    """One unroll of ``d`` from expert 0's epoch 1 (fixed draws): the matching loss to epoch 2 and its gradients
    w.r.t. the learnables (images, raw lr; DATM: soft labels)."""
    start = d.experts[0][1].float()
    loss = d.matching_loss(d.unroll(start, generator(0)), start, d.experts[0][2].float())
    return [loss, *torch.autograd.grad(loss, [t for _, t in d.learnables()])]


@pytest.mark.parametrize("method", ["mtt", "datm"])
def test_recomputed_student_steps_equal_kept_graphs(digits, experts, method):
    """``recompute_steps`` (each step checkpointed, redone in the backward with its DSA draw replayed) gives the
    same matching loss and the same gradients to the images, the lr and DATM's labels as the kept graphs, with
    student batches of 7 of the 20 images (DSA on); a replay that draws differently would not."""
    kw = dict(syn_steps=4, batch_syn=7, dsa=True)
    kept = matching_loss_and_grads(build(method, digits, experts, **kw))
    d = build(method, digits, experts, recompute_steps=True, **kw)
    recomputed = matching_loss_and_grads(d)
    assert len(kept) == (4 if method == "datm" else 3)  # loss, images, raw lr (, labels)
    for a, b in zip(kept, recomputed):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)

    step_batch = d.step_batch  # the backward's replay shifted by one draw: the images' gradient changes

    def shifted(idx, g):
        if torch.is_grad_enabled():  # the backward's recomputation (a Function's forward runs without grad)
            torch.rand(1, generator=g)
        return step_batch(idx, g)

    d.step_batch = shifted
    assert not torch.allclose(matching_loss_and_grads(d)[1], kept[1], rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("method", ["mtt", "datm"])
def test_recomputed_student_steps_give_the_same_iteration(digits, experts, method):
    """One whole ``step()`` with ``recompute_steps`` moves the images, the lr and DATM's labels as without."""
    extra = dict(threshold=float("inf")) if method == "datm" else {}  # DATM: no skipped update
    runs = [build(method, digits, experts, recompute_steps=on, lr_img=1.0, **extra) for on in (False, True)]
    before = [t.detach().clone() for _, t in runs[0].learnables()]
    losses = [d.step(0)["loss"] for d in runs]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-6)
    for start, (_, a), (_, b) in zip(before, runs[0].learnables(), runs[1].learnables()):
        moved = a.detach() - start
        assert moved.abs().max() > 0  # the update was applied
        torch.testing.assert_close(b.detach() - start, moved, rtol=1e-4, atol=1e-5 * moved.abs().max().item())


def test_matching_loss_is_zero_on_the_target(digits, experts):
    d = build("mtt", digits, experts)
    start, target = d.experts[0][0].float(), d.experts[0][1].float()
    assert d.matching_loss(target, start, target).item() == 0.0
    assert d.matching_loss(start, start, target).item() == pytest.approx(1.0)


def test_mtt_runs_and_gives_an_evaluable_set(digits, experts, tmp_path):
    synset = distill("mtt", digits, seed=0, device="cpu", show_progress=False, experts=experts, model=MODEL,
                     ipc=2, iterations=3, lr_img=10.0, **WINDOW)
    loss = synset.meta["history"]["loss"]
    assert len(loss) == 3 and all(0 < v < 10 for v in loss)
    assert synset.lr is not None and synset.lr.item() > 0 and synset.labels.dim() == 1
    assert synset.meta["experts"]["settings"]["config"]["optimizer"] == "sgd"
    assert synset.meta["config"]["experts"] == experts
    synset.save(tmp_path / "synset.pt")
    again = SyntheticSet.load(tmp_path / "synset.pt")
    result = evaluate_synset(again, digits, num_eval=1, epochs=2)
    assert len(result.accuracies) == 1 and 0 <= result.accuracy_mean <= 1
    assert torch.equal(synset.images, distill("mtt", digits, seed=0, device="cpu", show_progress=False,
                                              experts=experts, model=MODEL, ipc=2, iterations=3, lr_img=10.0,
                                              **WINDOW).images)


def test_datm_window_expands_over_iterations(digits, experts):
    d = build("datm", digits, experts)
    assert [d.upper_start_epoch(it) for it in (0, 2, 4, 100)] == [2, 2, 3, 3]
    d = build("datm", digits, experts, sequential=False)
    assert d.upper_start_epoch(0) == 3


def test_datm_initialisation_from_experts(digits, experts):
    d = build("datm", digits, experts, ipc=3)
    final = d.experts.final(0)
    right = d.flat(final, d.images.detach()).argmax(dim=1) == d.labels
    for c in range(10):  # as many correctly classified images as the class has, up to ipc
        real_c = digits.train_images[digits.train_labels == c]
        available = int((d.flat(final, real_c).argmax(dim=1) == c).sum())
        assert int(right[d.labels == c].sum()) == min(3, available)
    assert d.label_logits.shape == (30, 10) and d.label_logits.requires_grad
    assert torch.allclose(soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 3)), torch.tensor(3.0).log())


@pytest.mark.parametrize("method, extra", [("datm", {"temperature": 2.0}), ("pad", {}),
                                           ("pad", {"filter": "loss", "drop_ratio": 0.5})])
def test_datm_and_pad_keep_soft_labels_finite(digits, experts, method, extra):
    synset = distill(method, digits, seed=0, device="cpu", show_progress=False, experts=experts, model=MODEL,
                     ipc=2, iterations=4, lr_img=10.0, lr_y=5.0, threshold=float("inf"),
                     **{**DATM_WINDOW, **extra})
    assert synset.labels.shape == (20, 10) and bool(torch.isfinite(synset.labels).all())
    assert all(torch.isfinite(torch.tensor(synset.meta["history"]["loss"])))
    assert synset.lr.item() > 0 and synset.meta["protocol"]["batch_size"] == 128
    if method == "pad":
        assert synset.meta["pad"]["filter"] == extra.get("filter", "depth")
    result = evaluate_synset(synset, digits, num_eval=1, epochs=1)
    assert 0 <= result.accuracy_mean <= 1


def test_divergence_stops_with_the_last_good_set(digits, experts):
    from ddlib.methods import DivergenceError

    with pytest.raises(DivergenceError) as info:
        distill("mtt", digits, seed=0, device="cpu", show_progress=False, experts=experts, model=MODEL,
                ipc=1, iterations=6, lr_img=1e38, **WINDOW)
    assert "diverged" in str(info.value) and info.value.last_good is not None
    assert bool(torch.isfinite(info.value.last_good.images).all())


def test_datm_threshold_skips_updates(digits, experts):
    d = build("datm", digits, experts, threshold=0.0)
    before = d.images.detach().clone()
    scalars = d.step(0)
    assert scalars["skipped"].item() == 1.0 and torch.equal(d.images.detach(), before)


def test_pad_depth_cut(digits, experts):
    d = build("pad", digits, experts, drop_ratio=0.25)
    assert d.depth_cut.start == int(0.25 * d.flat.num_params)
    assert d.synthetic_set().meta["pad"]["dropped_entries"] == d.depth_cut.start


@pytest.mark.parametrize("kw, message", [
    (dict(experts=""), "--experts"),
    (dict(max_start_epoch=3, expert_epochs=2), "exceeds"),
    (dict(model="convnet"), "--model convnetw16"),
])
def test_clear_errors(digits, experts, kw, message):
    with pytest.raises(ValueError, match=message):
        build("mtt", digits, kw.pop("experts", experts), **kw)


def test_cli_experts_then_distill(tmp_path, capsys):
    from ddlib.cli import main

    experts = tmp_path / "experts"
    common = ["--dataset", "digits", "--image-size", "8", "--seed", "0", "--device", "cpu"]
    assert main(["experts", *common, "--num-experts", "2", "--epochs", "2", "--subset", "5", "--model", MODEL,
                 "--set", "batch_size=32", "--out", str(experts)]) == 0
    assert main(["experts", *common, "--num-experts", "2", "--epochs", "2", "--subset", "5", "--model", MODEL,
                 "--set", "batch_size=32", "--out", str(experts)]) == 0  # resumed: nothing to do
    assert main(["experts", *common, "--num-experts", "2", "--epochs", "2", "--subset", "5", "--model", MODEL,
                 "--optimizer", "gsam", "--set", "batch_size=32", "--out", str(experts)]) == 2
    assert "must not be mixed" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["distill", "--method", "mtt", "--experts", str(experts), *common, "--model", MODEL, "--ipc", "1",
                 "--iterations", "2", "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "1",
                 "--lr-img", "10", "--num-eval", "1", "--eval-epochs", "1", "--no-random-baseline",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "mtt" and 0 <= metrics["accuracy_mean"] <= 1
    synset = SyntheticSet.load(out / "synset.pt")
    assert synset.lr.item() > 0 and synset.meta["config"]["experts"] == str(experts)
    assert main(["evaluate", str(out / "synset.pt"), "--num-eval", "1", "--eval-epochs", "1",
                 "--no-random-baseline"]) == 0


@pytest.mark.filterwarnings("ignore:.*student lr collapsed:RuntimeWarning")  # tiny experts, 2 iterations
def test_cli_zca_experts_distill_evaluate_and_resume(tmp_path, capsys):
    """--zca whitens the data of every command; experts, distillation and evaluation must all agree on it."""
    from ddlib.cli import main

    experts, out = tmp_path / "experts", tmp_path / "run"
    common = ["--dataset", "digits", "--image-size", "8", "--seed", "0", "--device", "cpu", "--model", MODEL]
    assert main(["experts", *common, "--zca", "--num-experts", "1", "--epochs", "2", "--subset", "5",
                 "--set", "batch_size=32", "--out", str(experts)]) == 0
    run = ["distill", "--method", "mtt", "--experts", str(experts), *common, "--ipc", "1", "--syn-steps", "2",
           "--expert-epochs", "1", "--max-start-epoch", "1", "--lr-img", "10", "--no-eval"]
    assert main([*run, "--iterations", "2", "--out", str(out)]) == 2  # experts whitened, this run not
    assert "zca=True" in capsys.readouterr().err
    assert main([*run, "--zca", "--iterations", "2", "--checkpoint-every", "1", "--out", str(out)]) == 0
    synset = SyntheticSet.load(out / "synset.pt")
    assert synset.meta["dataset"]["zca"] is True and synset.meta["zca_state"] is not None
    assert main(["distill", "--resume", str(out), "--iterations", "3", "--no-eval"]) == 0  # keeps --zca
    assert SyntheticSet.load(out / "synset.pt").meta["iterations"] == 3
    assert main(["evaluate", str(out / "synset.pt"), "--num-eval", "1", "--eval-epochs", "1",
                 "--no-random-baseline", "--out", str(tmp_path / "ev")]) == 0  # whitens from the synset's meta


def test_a_collapsed_student_lr_is_reported_with_the_reason(digits, experts):
    with pytest.warns(RuntimeWarning, match="iteration 1: the learnable student lr collapsed to 1.0e-09.*lr_teacher"):
        distill("mtt", digits, seed=0, device="cpu", show_progress=False, experts=experts, model=MODEL,
                ipc=1, iterations=2, lr_teacher=1e-9, **WINDOW)
