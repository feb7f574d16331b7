"""Expert trajectories: flat parameters, the matching distance, PAD's filters and schedule, GSAM, and
resumable, verified expert files."""
from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

from ddlib import trajectory as trajectory_module
from ddlib.data import load_dataset
from ddlib.models import get_network
from ddlib.rng import generator
from ddlib.trajectory import (
    GSAM,
    ExpertConfig,
    ExpertFileError,
    FlatModel,
    curriculum_fractions,
    curriculum_indices,
    depth_keep,
    difficulty_order,
    el2n_scores,
    ensure_experts,
    expert_file,
    experts_folder,
    load_experts,
    loss_keep,
    parameter_distance,
    train_experts,
)

TINY = dict(epochs=2, model="convnetw16", subset=6, batch_size=32)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", image_size=8)


def test_flat_forward_equals_the_module():
    net = get_network("convnetw16", 1, 10, 8, seed=3)
    flat = FlatModel(net)
    x = torch.randn(5, 1, 8, 8, generator=generator(0))
    vector = flat.flatten()
    assert vector.shape == (flat.num_params,) == (sum(p.numel() for p in net.parameters()),)
    assert torch.allclose(flat(vector, x), net(x), atol=1e-6)
    other = get_network("convnetw16", 1, 10, 8, seed=4)
    assert torch.allclose(flat(FlatModel(other).flatten(), x), other(x), atol=1e-6)
    assert torch.equal(FlatModel(other).flatten(flat.load_into(vector, other)), vector)


def test_flat_model_refuses_batchnorm():
    with pytest.raises(ValueError, match="BatchNorm"):
        FlatModel(get_network("convnetbn", 1, 10, 8))


def test_distance_is_zero_on_target_and_one_at_start():
    g = generator(1)
    start, target = torch.randn(50, generator=g), torch.randn(50, generator=g)
    assert parameter_distance(target, target, start).item() == 0.0
    assert parameter_distance(start, target, start).item() == pytest.approx(1.0)
    halfway = (start + target) / 2
    assert parameter_distance(halfway, target, start).item() == pytest.approx(0.25)


def test_depth_filter_drops_exactly_the_leading_entries():
    for length, ratio in ((10, 0.25), (317_706, 0.25), (320_010, 0.5), (7, 0.0)):
        keep = depth_keep(length, ratio)
        assert keep.start == int(ratio * length) and keep.stop == length
    g = generator(2)
    start, target, student = (torch.randn(40, generator=g) for _ in range(3))
    keep = depth_keep(40, 0.25)  # drops 10 entries
    base = parameter_distance(student, target, start, keep)
    moved = student.clone()
    moved[:10] += 100.0  # the dropped shallow entries do not matter
    assert parameter_distance(moved, target, start, keep).item() == pytest.approx(base.item())
    moved[10] += 1.0     # the first kept one does
    assert parameter_distance(moved, target, start, keep).item() != pytest.approx(base.item())
    manual = (student[10:] - target[10:]).pow(2).sum() / (start[10:] - target[10:]).pow(2).sum()
    assert base.item() == pytest.approx(manual.item())


def test_loss_filter_drops_the_smallest_errors():
    errors = torch.tensor([5.0, 0.1, 3.0, 0.2, 4.0, 0.3, 1.0, 2.0])
    keep = loss_keep(errors, 0.25)  # drops 2 entries: the 0.1 and the 0.2
    assert keep.tolist() == [1, 0, 1, 0, 1, 1, 1, 1]
    assert loss_keep(errors, 0.0).sum() == 8


def test_gsam_matches_the_formula_on_a_quadratic():
    a = torch.tensor([1.0, 4.0, 0.5])
    w0 = torch.tensor([1.0, -2.0, 3.0])
    rho, alpha, lr = 0.1, 0.3, 0.05
    w = w0.clone().requires_grad_(True)
    GSAM([w], torch.optim.SGD([w], lr=lr), rho, alpha, adaptive=False).step(lambda: 0.5 * (a * w * w).sum())
    g = a * w0
    g_adv = a * (w0 + rho * g / g.norm())
    vertical = g - (g @ g_adv) / g_adv.norm() ** 2 * g_adv
    expected = w0 - lr * (g_adv - alpha * vertical)
    assert torch.allclose(w.detach(), expected, atol=1e-6)
    # adaptive: perturbation rho * w^2 * g / || |w| g ||
    w = w0.clone().requires_grad_(True)
    GSAM([w], torch.optim.SGD([w], lr=lr), rho, 0.0, adaptive=True).step(lambda: 0.5 * (a * w * w).sum())
    shift = rho * w0 * w0 * g / (w0.abs() * g).norm()
    assert torch.allclose(w.detach(), w0 - lr * a * (w0 + shift), atol=1e-6)


def test_curriculum_schedule():
    cfg = ExpertConfig(curriculum=True, init_ratio=0.5, add_end_epoch=4, rm_epoch_first=6, rm_epoch_second=8,
                       rm_easy_ratio_first=0.1, rm_easy_ratio_second=0.2)
    assert curriculum_fractions(0, cfg) == (0.0, 0.5)
    assert curriculum_fractions(2, cfg) == (0.0, 0.75)
    assert curriculum_fractions(5, cfg) == (0.0, 1.0)
    assert curriculum_fractions(7, cfg) == (0.1, 1.0)
    assert curriculum_fractions(9, cfg) == (0.2, 1.0)
    order = [torch.arange(10), torch.arange(10, 20)]  # easy -> hard
    assert curriculum_indices(order, 0, cfg).tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
    assert curriculum_indices(order, 9, cfg).tolist() == list(range(2, 10)) + list(range(12, 20))


def test_el2n_scores_and_order(digits):
    idx = torch.arange(0, 200)
    scores = el2n_scores(digits, indices=idx, model="convnetw16", num_nets=2, epochs=1, batch_size=64)
    assert scores.shape == (200,) and bool(torch.isfinite(scores).all())
    assert float(scores.min()) >= 0 and float(scores.max()) <= 2 ** 0.5 + 1e-6
    order = difficulty_order(scores, digits.train_labels[idx], digits.num_classes)
    assert sum(o.numel() for o in order) == 200
    for c, members in enumerate(order):
        assert bool((digits.train_labels[idx][members] == c).all())
        assert bool((scores[members].diff() >= 0).all())


def test_experts_files_index_and_loading(digits, tmp_path):
    out = train_experts(digits, ExpertConfig(num_experts=2, half=True, **TINY), tmp_path / "e", seed=0,
                        show_progress=False)
    index = json.loads((out / "index.json").read_text())
    assert index["num_experts"] == 2 and index["settings"]["config"]["optimizer"] == "sgd"
    assert index["settings"]["dataset"]["name"] == "digits" and set(index["experts"]) == {"0", "1"}
    experts = load_experts(out)
    flat = FlatModel(get_network("convnetw16", 1, 10, 8))
    assert len(experts) == 2 and experts.epochs == 2 and experts.num_params == flat.num_params
    assert experts[0].shape == (3, flat.num_params) and experts[0].dtype == torch.float16
    assert not torch.equal(experts[0][0], experts[1][0])   # experts start from different inits
    assert not torch.equal(experts[0][0], experts[0][-1])  # and move


def test_snapshots_within_an_epoch_add_points_without_changing_the_trajectory(digits, tmp_path):
    """k snapshots per epoch: k * epochs + 1 points whose every k-th is the once-per-epoch trajectory; with
    fewer batches than k, snapshots repeat so that the length (and the methods' epoch arithmetic) holds."""
    tiny = {**TINY, "batch_size": 16}  # 60 images: 4 batches per epoch
    dense = {k: load_experts(train_experts(digits, ExpertConfig(num_experts=1, snapshots_per_epoch=k, **tiny),
                                           tmp_path / f"k{k}", seed=0, show_progress=False)) for k in (1, 2, 8)}
    assert dense[1].epochs == 2 and dense[2].epochs == 4 and dense[8].epochs == 16
    assert dense[2].snapshots_per_epoch == 2 and "4 snapshots (2 per epoch)" in str(dense[2])
    assert torch.equal(dense[2][0][::2], dense[1][0]) and torch.equal(dense[8][0][::8], dense[1][0])
    assert not torch.equal(dense[2][0][1], dense[2][0][2])  # the half-epoch point is a point of its own
    assert torch.equal(dense[8][0][1], dense[8][0][2])      # 4 batches, 8 snapshots: each one taken twice
    with pytest.raises(ValueError, match="snapshots_per_epoch"):
        ExpertConfig(snapshots_per_epoch=0)


def test_ensure_experts_trains_once_then_reuses_the_shared_folder(digits, tmp_path, monkeypatch):
    cfg = ExpertConfig(num_experts=1, **TINY)
    folder = experts_folder(tmp_path / "experts", "digits", 8, cfg)
    assert folder.name == "digits_8px_convnetw16_sgd_1x2_subset6_batch32"
    other = ExpertConfig(num_experts=1, curriculum=True, optimizer="gsam", **TINY)
    assert experts_folder(tmp_path, "digits", 8, other).name.startswith("digits_8px_convnetw16_gsam-curriculum_")
    dense = ExpertConfig(num_experts=1, snapshots_per_epoch=2, **TINY)
    assert experts_folder(tmp_path, "digits", 8, dense).name == folder.name + "_2perepoch"
    experts = ensure_experts(digits, cfg, folder, seed=0)
    written = (folder / expert_file(0)).stat().st_mtime_ns
    reads = []
    real_read = trajectory_module._read_expert
    monkeypatch.setattr(trajectory_module, "_read_expert", lambda *a: reads.append(a) or real_read(*a))
    again = ensure_experts(digits, cfg, folder, seed=0)
    assert len(reads) == 1  # a finished folder: each file read and verified once, not twice
    assert (folder / expert_file(0)).stat().st_mtime_ns == written  # verified and kept, not retrained
    assert torch.equal(experts[0], again[0]) and len(again.test_accuracies) == 1
    assert 0.0 <= again.test_accuracies[0] <= 1.0
    assert str(again).startswith(f"1 experts (plain, sgd) in {folder}: 2 epochs, ")
    assert "final test accuracy" in str(again)
    with pytest.raises(ExpertFileError, match="seed"):  # other settings still go through train_experts' check
        ensure_experts(digits, cfg, folder, seed=1)


def test_interrupted_run_resumes_to_identical_files(digits, tmp_path):
    full = train_experts(digits, ExpertConfig(num_experts=3, **TINY), tmp_path / "full", seed=5, show_progress=False)
    part = tmp_path / "part"
    train_experts(digits, ExpertConfig(num_experts=1, **TINY), part, seed=5, show_progress=False)  # "stopped"
    train_experts(digits, ExpertConfig(num_experts=3, **TINY), part, seed=5, show_progress=False)  # resumed
    names = [expert_file(i) for i in range(3)] + ["index.json"]
    for name in names:
        assert (full / name).read_bytes() == (part / name).read_bytes(), name
    (part / expert_file(2)).unlink()  # lost the last file: retrained identically
    train_experts(digits, ExpertConfig(num_experts=3, **TINY), part, seed=5, show_progress=False)
    assert (full / expert_file(2)).read_bytes() == (part / expert_file(2)).read_bytes()


def test_corrupt_file_is_reported(digits, tmp_path):
    out = train_experts(digits, ExpertConfig(num_experts=2, **TINY), tmp_path / "e", seed=0, show_progress=False)
    path = out / expert_file(1)
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(ExpertFileError, match="expert_0001.pt is corrupt"):
        load_experts(out)
    with pytest.raises(ExpertFileError, match="corrupt"):
        train_experts(digits, ExpertConfig(num_experts=2, **TINY), out, seed=0, show_progress=False)
    # a readable file whose numbers changed is caught by the checksum
    payload = torch.load(out / expert_file(0), weights_only=True)
    payload["trajectory"][0, 0] += 1.0
    torch.save(payload, out / expert_file(0))
    with pytest.raises(ExpertFileError, match="checksum"):
        load_experts(out, limit=1)


def test_mixing_settings_is_refused(digits, tmp_path):
    out = train_experts(digits, ExpertConfig(num_experts=1, **TINY), tmp_path / "e", seed=0, show_progress=False)
    with pytest.raises(ExpertFileError, match="optimizer: 'sgd' there, 'gsam' now"):
        train_experts(digits, ExpertConfig(num_experts=2, optimizer="gsam", **TINY), out, seed=0,
                      show_progress=False)
    with pytest.raises(ExpertFileError, match="seed"):
        train_experts(digits, ExpertConfig(num_experts=2, **TINY), out, seed=1, show_progress=False)
    with pytest.raises(ExpertFileError, match="no expert trajectories"):
        load_experts(tmp_path / "nothing")


def test_a_folder_older_than_an_expert_setting_resumes_and_loads(digits, tmp_path):
    out = train_experts(digits, ExpertConfig(num_experts=1, **TINY), tmp_path / "e", seed=0, show_progress=False)
    index = json.loads((out / "index.json").read_text())
    del index["settings"]["config"]["score_epochs"]  # as written before the field existed
    (out / "index.json").write_text(json.dumps(index))
    assert load_experts(out).config["score_epochs"] == ExpertConfig.score_epochs
    train_experts(digits, ExpertConfig(num_experts=2, **TINY), out, seed=0, show_progress=False)
    assert len(load_experts(out)) == 2
    with pytest.raises(ExpertFileError, match="score_epochs: 2 there, 3 now"):
        train_experts(digits, ExpertConfig(num_experts=3, score_epochs=3, **TINY), out, seed=0,
                      show_progress=False)


def test_gsam_and_curriculum_experts_train(digits, tmp_path):
    cfg = ExpertConfig(num_experts=1, optimizer="gsam", curriculum=True, add_end_epoch=1, rm_epoch_first=1,
                       rm_epoch_second=1, score_nets=1, score_epochs=1, **TINY)
    out = train_experts(digits, cfg, tmp_path / "e", seed=0, show_progress=False)
    trajectory = load_experts(out)[0]
    assert trajectory.shape[0] == 3 and bool(torch.isfinite(trajectory).all())
    assert (out / "difficulty.pt").exists()
    assert F.mse_loss(trajectory[0], trajectory[-1]) > 0


def test_expert_config_from_notebook_parameters_maps_their_names_and_ignores_the_rest():
    params = {"num_experts": 2, "expert_train_epochs": 3, "expert_batch": 64, "expert_subset": 20,
              "expert_optimizer": "gsam", "expert_half": True, "init_ratio": 0.5, "expert_snapshots_per_epoch": 2,
              "lr": 5.0, "ipc": 10}
    cfg = ExpertConfig.from_parameters(params, curriculum=True)
    assert (cfg.num_experts, cfg.epochs, cfg.batch_size, cfg.subset) == (2, 3, 64, 20)
    assert cfg.optimizer == "gsam" and cfg.half and cfg.curriculum and cfg.init_ratio == 0.5
    assert cfg.snapshots_per_epoch == 2
    assert cfg.lr == ExpertConfig().lr  # a notebook's other variables never leak into the experts
    assert set(ExpertConfig.NOTEBOOK_PARAMETERS.values()) <= {f.name for f in fields(ExpertConfig)}
