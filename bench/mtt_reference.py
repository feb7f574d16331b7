"""MTT's and DATM's iteration, ddlib vs the official code's unroll: peak GPU memory and time, side by side.

    python -m bench.mtt_reference --device cuda [--grid 10x20x100 50x50x500 ...] [--repeats 3]
                                  [--data-root ../shared/data] [--out results/bench]

The official MTT (GeorgeCazenavette/mtt-distillation, distill.py) is not vendored here; ``reference_iteration``
re-states its iteration in plain PyTorch: the student's flat parameters appended to a list at every one of N
steps (``student_params[-1] - syn_lr * grad``, the gradient taken with ``create_graph=True`` on a
``batch_syn`` chunk of a random permutation, DSA applied), the normalised squared distance of the last one to
the target, one backward, SGD on the images and the lr. The network (``FlatModel``, the official
``ReparamModule``'s flat-vector forward) and the DSA are ddlib's, so the ratio measures the unroll. ddlib's
sides are ``MTT.step`` and ``DATM.step`` with the official graph-keeping unroll and with ``recompute_steps``
(each step's pass redone in the backward), at the same N and batch_syn. Each grid point is
IPCxNxBATCH_SYN on MNIST; experts are ``bench.run``'s two tiny SGD trajectories (``TINY_EXPERTS``), trained
first (cost and memory do not depend on how good they are). On a GPU each side's peak memory above what was
allocated before its iteration is recorded (``side_by_side.time_alternately``); the CPU run times only. Writes
``<out>/mtt-memory-<device>.json``. The tests run it only at a tiny grid point on fixture data.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from bench import side_by_side
from bench.run import TINY_EXPERTS
from ddlib.data import load_dataset
from ddlib.io import save_json
from ddlib.methods import make_config
from ddlib.methods.registry import get_method
from ddlib.rng import generator
from ddlib.trajectory import ExpertConfig, train_experts
from ddlib.utils import environment, resolve_device


def reference_iteration(flat, images: Tensor, labels: Tensor, syn_lr: Tensor, opts: list, start: Tensor,
                        target: Tensor, syn_steps: int, batch_syn: int, dsa, rng: torch.Generator) -> None:
    """One official MTT iteration: images [n, C, H, W] and the learnable ``syn_lr`` [] updated by ``opts``."""
    student_params = [start.clone().requires_grad_(True)]
    chunks: list[Tensor] = []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.randperm(images.shape[0], generator=rng).split(batch_syn))
        idx = chunks.pop().to(images.device)
        x = dsa(images[idx], rng)
        ce = F.cross_entropy(flat(student_params[-1], x), labels[idx])
        grad = torch.autograd.grad(ce, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - syn_lr * grad)
    loss = F.mse_loss(student_params[-1], target, reduction="sum") / F.mse_loss(start, target, reduction="sum")
    for opt in opts:
        opt.zero_grad()
    loss.backward()
    for opt in opts:
        opt.step()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mtt_reference", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=None, help="real data (default $DDLIB_DATA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--grid", nargs="+", default=["10x20x100", "10x50x100", "50x30x500"],
                   help="IPCxNxBATCH_SYN points (images per class, student steps, images per step)")
    p.add_argument("--repeats", type=int, default=3, help="timed iterations of each side (after one warm-up)")
    p.add_argument("--out", default="results/bench")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    real = load_dataset("mnist", args.data_root, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        experts = train_experts(real, ExpertConfig(**TINY_EXPERTS), Path(tmp) / "experts",
                                seed=0, device=device, show_progress=False)
        points = [run_point(point, real, str(experts), args.repeats, device)
                  for point in args.grid]
    report = {"device": str(device), "environment": environment(), "points": points}
    path = Path(args.out) / f"mtt-memory-{device.type}.json"
    save_json(report, path)
    print(f"-> {path}")
    return 0


def run_point(point: str, real, experts: str, repeats: int, device: torch.device) -> dict:
    """Time (and on a GPU, measure the memory of) every side at one IPCxNxBATCH_SYN point."""
    ipc, syn_steps, batch_syn = (int(v) for v in point.split("x"))
    common = dict(ipc=ipc, experts=experts, syn_steps=syn_steps, batch_syn=batch_syn, expert_epochs=2,
                  max_start_epoch=4, lr_img=100.0)
    sides, distillers = {}, {}
    for method in ("mtt", "datm"):
        window = dict(current_max_start_epoch=2) if method == "datm" else {}
        for recompute in (False, True):
            name = method + ("-recompute" if recompute else "")
            cfg = make_config(method, **common, **window, recompute_steps=recompute)
            distillers[name] = get_method(method)(real, cfg, seed=0, device=device)
            sides[name] = distillers[name].step
    mtt = distillers["mtt"]
    images = mtt.images.detach().clone().requires_grad_(True)
    syn_lr = torch.tensor(mtt.cfg.lr_teacher, device=device, requires_grad=True)
    opts = [torch.optim.SGD([images], lr=mtt.cfg.lr_img, momentum=0.5),
            torch.optim.SGD([syn_lr], lr=mtt.cfg.lr_lr, momentum=0.5)]
    labels = torch.arange(real.num_classes, device=device).repeat_interleave(ipc)

    def reference(rep: int) -> None:
        trajectory = mtt.experts[rep % len(mtt.experts)]
        start = trajectory[1].to(device, torch.float32)
        target = trajectory[1 + mtt.cfg.expert_epochs].to(device, torch.float32)
        reference_iteration(mtt.flat, images, labels, syn_lr, opts, start, target, syn_steps, batch_syn, mtt.dsa,
                            generator(0, "bench-iteration", rep))

    times = side_by_side.time_alternately({"reference": reference, **sides}, repeats + 1, device=device)
    medians = {k: statistics.median(v) for k, v in times.items() if v}
    row = {"ipc": ipc, "syn_steps": syn_steps, "batch_syn": batch_syn, "seconds": times, "median": medians}
    if "reference_peak_gib" in medians:
        row["memory_ratio_to_reference"] = {name: medians[f"{name}_peak_gib"] / medians["reference_peak_gib"]
                                            for name in sides}
    print(f"{point}: " + ", ".join(f"{k} {v:.3f}" for k, v in medians.items()), flush=True)
    return row


if __name__ == "__main__":
    raise SystemExit(main())
