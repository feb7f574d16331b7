"""The benchmark harness runs and writes its JSON and table (timings are never asserted)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.run import ENTRIES, main


def test_entries_cover_the_landed_methods():
    from ddlib.methods import list_methods

    assert {e.method for e in ENTRIES} <= set(list_methods())
    assert {"dm", "datadam", "dc", "dsa", "dd", "mtt", "datm", "pad"} <= {e.method for e in ENTRIES}


def test_bench_writes_json_and_table(tmp_path):  # fixture MNIST from DDLIB_DATA (conftest)
    code = main(["--only", "datadam-mnist-ipc10", "dd-mnist-ipc10", "--warmup", "0", "--repeats", "1",
                 "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0
    row = json.loads((tmp_path / "datadam-mnist-ipc10-cpu.json").read_text())
    for key in ("seconds_median", "seconds_min", "seconds_max", "flops", "flops_per_second",
                "matmul_flops_per_second", "efficiency", "peak_memory_bytes", "environment", "settings"):
        assert key in row
    assert row["flops"] > 0 and row["settings"]["ipc"] == 10
    table = (tmp_path / "table-cpu.md").read_text()
    assert "datadam-mnist-ipc10" in table and "dd-mnist-ipc10" in table


def test_bench_at_bf16_measures_the_bf16_matmul_rate_too(tmp_path):  # fixture MNIST from DDLIB_DATA (conftest)
    code = main(["--only", "dd-mnist-ipc10", "--warmup", "0", "--repeats", "1", "--device", "cpu",
                 "--precision", "bf16", "--out", str(tmp_path)])
    assert code == 0
    row = json.loads((tmp_path / "dd-mnist-ipc10-bf16-cpu.json").read_text())
    assert row["precision"] == "bf16" and row["settings"]["precision"] == "bf16"
    assert row["matmul_flops_per_second_precision"] > 0 and row["efficiency_precision"] > 0
    assert "bf16" in (tmp_path / "table-cpu.md").read_text()


def test_bench_profile_splits_a_unit_s_time_by_operator_kind(tmp_path):  # fixture MNIST (conftest)
    code = main(["--only", "dd-mnist-ipc10", "--warmup", "0", "--repeats", "1", "--device", "cpu", "--profile",
                 "--out", str(tmp_path)])
    assert code == 0
    prof = json.loads((tmp_path / "dd-mnist-ipc10-cpu.json").read_text())["profile"]
    assert sum(prof["by_kind"].values()) == pytest.approx(1.0)
    assert prof["by_kind"]["convolution"] > 0 and prof["seconds"] > 0  # LeNet's convolutions
    assert prof["top_ops"] and prof["top_ops"][0]["seconds"] >= prof["top_ops"][-1]["seconds"]


def test_op_kind_groups_aten_operators():
    from bench.run import op_kind

    assert op_kind("aten::convolution_backward") == "convolution"
    assert op_kind("aten::addmm") == "matmul" and op_kind("aten::mm") == "matmul"
    assert op_kind("aten::native_group_norm_backward") == "normalisation"
    assert op_kind("aten::max_pool2d_with_indices") == "pooling"
    assert op_kind("aten::mul") == "elementwise and copies"
    assert op_kind("autograd::engine::evaluate_function: MulBackward0") == "other"


def test_trajectory_entry_trains_experts_and_reports_budget_accuracy(tmp_path):
    cache = tmp_path / "experts"
    code = main(["--only", "mtt-mnist-ipc10-n10-b50", "--warmup", "0", "--repeats", "1", "--device", "cpu",
                 "--out", str(tmp_path), "--experts-cache", str(cache), "--accuracy-iterations", "1",
                 "--accuracy-epochs", "1"])
    assert code == 0
    row = json.loads((tmp_path / "mtt-mnist-ipc10-n10-b50-cpu.json").read_text())
    assert row["settings"]["syn_steps"] == 10 and row["settings"]["batch_syn"] == 50
    assert list(cache.iterdir()) and row["settings"]["experts"].startswith(str(cache))
    assert row["budget_iterations"] == 1 and 0.0 <= row["budget_accuracy"] <= 1.0


def test_dc_reference_distance_is_ddlibs_layerwise_distance():
    """The re-stated official match_loss and ddlib's layer-wise distance agree, so the timing compares the same work."""
    import torch

    from bench.dc_reference import layerwise_distance
    from ddlib.methods.dc import gradient_distance

    g = torch.Generator().manual_seed(0)
    shapes = [(8, 1, 3, 3), (8,), (10, 32)]
    syn = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    real = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    ours = gradient_distance({str(i): t[None] for i, t in enumerate(syn)},
                             {str(i): t[None] for i, t in enumerate(real)}, "layerwise")
    assert torch.allclose(layerwise_distance(syn, real), ours)


def test_dc_reference_writes_its_json(tmp_path):  # fixture MNIST from DDLIB_DATA (conftest)
    from bench.dc_reference import main as reference_main

    assert reference_main(["--ipc", "1", "--batch-real", "8", "--repeats", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "dc-reference-ipc1-cpu.json").read_text())
    assert report["unit"] == "outer step" and "accuracy" not in report
    assert len(report["seconds"]["ddlib"]) == 1 and report["ratio_ddlib_to_reference"] > 0


def test_dc_reference_accuracy_mode_runs_whole_iterations_and_evaluates_both(tmp_path):
    from bench.dc_reference import main as reference_main

    assert reference_main(["--ipc", "2", "--batch-real", "4", "--accuracy-iterations", "2", "--eval-epochs", "1",
                           "--num-eval", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "dc-reference-ipc2-acc2-cpu.json").read_text())
    assert report["unit"] == "iteration" and report["outer_steps"] == 2
    assert len(report["seconds"]["reference"]) == 1 and len(report["seconds"]["reference_inner_s"]) == 1
    assert set(report["seconds"]) == {"reference", "reference_matching_s", "reference_inner_s", "ddlib"}
    accuracy = report["accuracy"]
    assert len(accuracy["reference"]["accuracies"]) == 2 and len(accuracy["ddlib"]["accuracies"]) == 2
    assert accuracy["difference"] == accuracy["ddlib"]["accuracy_mean"] - accuracy["reference"]["accuracy_mean"]


def test_dm_reference_writes_its_json_and_moves_the_images(tmp_path):  # fixture MNIST from DDLIB_DATA (conftest)
    import torch

    from bench.dm_reference import main as reference_main
    from bench.dm_reference import reference_iteration
    from ddlib.augment import DSA
    from ddlib.data import load_dataset
    from ddlib.models import get_network

    assert reference_main(["--ipc", "1", "--batch-real", "8", "--repeats", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "dm-reference-ipc1-cpu.json").read_text())
    assert report["unit"] == "iteration" and len(report["seconds"]["ddlib"]) == 1
    assert report["ratio_ddlib_to_reference"] > 0
    real = load_dataset("mnist")
    net = get_network("convnet", 1, 10, real.image_size).requires_grad_(False)
    images = torch.zeros(10, 1, real.image_size, real.image_size, requires_grad=True)
    before = images.detach().clone()
    reference_iteration(net, images, torch.optim.SGD([images], lr=1.0), real, 4, DSA(),
                        torch.Generator().manual_seed(0))
    assert (images.detach() != before).flatten(1).any(dim=1).all()  # one backward reached every class's image


def test_dm_reference_accuracy_mode_evaluates_both_sets_with_the_same_seeds(tmp_path):
    from bench.dm_reference import main as reference_main

    assert reference_main(["--ipc", "1", "--batch-real", "4", "--accuracy-iterations", "2", "--eval-epochs", "1",
                           "--num-eval", "1", "--out", str(tmp_path)]) == 0
    accuracy = json.loads((tmp_path / "dm-reference-ipc1-acc2-cpu.json").read_text())["accuracy"]
    assert accuracy["protocol"] == "dc" and accuracy["num_eval"] == 1
    assert {"reference", "ddlib", "difference", "within_one_std_or_better"} <= set(accuracy)


def test_mtt_reference_times_every_side_and_its_unroll_moves_images_and_lr(tmp_path):  # fixture MNIST
    from bench.mtt_reference import main as reference_main

    assert reference_main(["--grid", "2x3x5", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path)]) == 0
    point = json.loads((tmp_path / "mtt-memory-cpu.json").read_text())["points"][0]
    assert (point["ipc"], point["syn_steps"], point["batch_syn"]) == (2, 3, 5)
    assert set(point["median"]) == {"reference", "mtt", "mtt-recompute", "datm", "datm-recompute"}


def test_mtt_reference_iteration_moves_the_images_and_the_lr():
    import torch

    from bench.mtt_reference import reference_iteration
    from ddlib.augment import DSA
    from ddlib.models import get_network
    from ddlib.trajectory import FlatModel

    flat = FlatModel(get_network("convnetw16", 1, 10, 16))
    start = flat.flatten()
    images = torch.randn(20, 1, 16, 16, requires_grad=True)
    syn_lr = torch.tensor(0.01, requires_grad=True)
    before = images.detach().clone(), syn_lr.detach().clone()
    opts = [torch.optim.SGD([images], lr=10.0), torch.optim.SGD([syn_lr], lr=1e-3)]
    reference_iteration(flat, images, torch.arange(10).repeat_interleave(2), syn_lr, opts, start,
                        start + 0.01 * torch.randn_like(start), 4, 5, DSA(), torch.Generator().manual_seed(0))
    assert (images.detach() != before[0]).flatten(1).any(dim=1).sum() >= 15  # 4 steps x 5 of the 20 images
    assert syn_lr.detach() != before[1]


@pytest.mark.parametrize("norm, power", [("instance", 4.0), ("batch", 1.0)])  # the paper's; the released code's
def test_datadam_reference_loss_is_ddlibs_loss_and_its_json_is_written(tmp_path, norm, power):  # fixture MNIST
    import torch

    from bench.datadam_reference import main as reference_main
    from bench.datadam_reference import reference_loss, relu_outputs
    from ddlib.data import load_dataset
    from ddlib.methods import get_method, make_config
    from ddlib.methods.datadam import _build_network

    real = load_dataset("mnist")
    cfg = make_config("datadam", ipc=2, batch_real=4, norm=norm, power=power)
    ours = get_method("datadam")(real, cfg, seed=0)
    net = _build_network(cfg, real.channels, real.num_classes, real.image_size, torch.device("cpu"))
    net.requires_grad_(False).train()
    real_x = real.sample_per_class(4, torch.Generator().manual_seed(0))  # [K, 4, C, H, W]
    syn_x = ours.per_class(ours.images.detach())
    expected = ours.loss(net, real_x, syn_x)[0]
    got = reference_loss(net, relu_outputs(net), real_x.flatten(0, 1), syn_x.flatten(0, 1), real.num_classes,
                         cfg.power, cfg.mmd_weight)
    assert torch.allclose(got, expected, rtol=1e-4)
    assert reference_main(["--ipc", "1", "--batch-real", "4", "--repeats", "1", "--norm", norm, "--power", str(power),
                           "--out", str(tmp_path)]) == 0
    report = json.loads(next(tmp_path.glob("datadam-*reference-ipc1-cpu.json")).read_text())
    assert report["power"] == power and report["norm"] == norm and len(report["seconds"]["reference"]) == 1


def test_mtt_chunks_alternates_both_settings_and_writes_its_json(tmp_path):  # fixture MNIST (conftest)
    from bench.mtt_chunks import main as chunks_main
    from ddlib.data import load_dataset
    from ddlib.trajectory import ExpertConfig, train_experts

    experts = train_experts(load_dataset("mnist"), ExpertConfig(num_experts=1, epochs=2, subset=2, batch_size=16),
                            tmp_path / "experts", seed=0, show_progress=False)
    report = chunks_main(["--experts", str(experts), "--syn-steps", "2", "--batch-syn", "40", "--repeats", "1",
                          "--expert-epochs", "1", "--max-start-epoch", "1", "--out", str(tmp_path / "c.json")])
    assert report["slice_images"] == 32 and set(report["median_seconds"]) == {"whole_batch", "slices"}
    assert json.loads((tmp_path / "c.json").read_text())["ratio_slices_to_whole"] > 0


def test_gpu_script_parses_and_names_an_unknown_part(tmp_path):
    """bench/gpu.sh runs only on a lent GPU; here its syntax and its refusal of an unknown part are checked."""
    import subprocess

    script = Path(__file__).parent.parent / "bench" / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    done = subprocess.run(["bash", str(script), "nosuchpart"], env={**os.environ, "OUT": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert "unknown part: nosuchpart" in done.stdout and (tmp_path / "log.txt").is_file()
