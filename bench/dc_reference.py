"""DC's outer step, ddlib vs the official code's loop, timed side by side on the same CPU.

    python -m bench.dc_reference [--ipc 10] [--repeats 3] [--threads 1] [--data-root ../shared/data]
                                 [--out results/bench]

The official DC (VICO-UoE/DatasetCondensation, main.py) is not vendored here; ``reference_outer_step``
re-states its outer step in plain PyTorch: for each class in turn, the real gradient (256 images) and the
synthetic one (``create_graph``), the layer-wise distance summed over classes, one SGD step of the images
(lr 0.1, momentum 0.5), then ``inner`` epochs of SGD (lr 0.01) on the synthetic set in one batch, as its
``epoch('train', ...)`` does for 100 images with batch 256. ddlib's ``DC.outer_step`` does the same work
(same network, same FLOPs). Both run on the same thread count in the same process, alternately, so load on
the other core affects both alike. Writes ``<out>/dc-reference-ipc<IPC>-cpu.json`` and prints the medians.
Not run by the tests.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def layerwise_distance(g_syn: list[Tensor], g_real: list[Tensor]) -> Tensor:
    """The official ``match_loss`` ('ours'): per-output-row cosine distance, 1-D tensors skipped."""
    total = g_syn[0].new_zeros(())
    for a, b in zip(g_syn, g_real):
        if a.dim() == 1:
            continue
        a, b = a.flatten(1), b.flatten(1)
        total = total + (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-6)).sum()
    return total


def reference_outer_step(net: nn.Module, images: Tensor, image_opt: torch.optim.Optimizer, real_x: Tensor,
                         inner: int, rng: torch.Generator) -> dict[str, float]:
    """One outer step the official way: real_x [K, n, C, H, W], images [K * ipc, C, H, W] (class-major).
    Returns the seconds of the matching and of the inner training."""
    start = time.perf_counter()
    params = list(net.parameters())
    k, ipc = real_x.shape[0], images.shape[0] // real_x.shape[0]
    loss = images.new_zeros(())
    for c in range(k):
        y_real = torch.full((real_x.shape[1],), c)
        g_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(real_x[c]), y_real), params)]
        y_syn = torch.full((ipc,), c)
        g_syn = torch.autograd.grad(F.cross_entropy(net(images[c * ipc:(c + 1) * ipc]), y_syn), params,
                                    create_graph=True)
        loss = loss + layerwise_distance(list(g_syn), g_real)
    image_opt.zero_grad()
    loss.backward()
    image_opt.step()
    matched = time.perf_counter()
    net_opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = images.detach().clone(), torch.arange(k).repeat_interleave(ipc)
    for _ in range(inner):
        order = torch.randperm(x.shape[0], generator=rng)
        net_opt.zero_grad()
        F.cross_entropy(net(x[order]), y[order]).backward()
        net_opt.step()
    return {"matching_s": matched - start, "inner_s": time.perf_counter() - matched}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dc_reference", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed outer steps of each (after one warm-up)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/bench")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from ddlib.data import load_dataset
    from ddlib.io import save_json
    from ddlib.methods import make_config
    from ddlib.methods.registry import get_method
    from ddlib.models import get_network, init_parameters_
    from ddlib.rng import generator
    from ddlib.utils import cpu_name, environment

    real = load_dataset(args.dataset, args.data_root)
    cfg = make_config("dc", ipc=args.ipc, batch_real=args.batch_real, init="real", class_grads="loop")
    ours = get_method("dc")(real, cfg, seed=0)
    inner = ours.inner
    net = get_network(cfg.model, real.channels, real.num_classes, real.image_size)
    images = ours.images.detach().clone().requires_grad_(True)
    image_opt = torch.optim.SGD([images], lr=cfg.lr_img, momentum=0.5)
    real_x = real.sample_per_class(args.batch_real, generator(0, "bench-real"))
    times: dict[str, list[float]] = {"ddlib": [], "reference": [], "reference_inner": []}
    for rep in range(args.repeats + 1):  # alternate, so a change in load hits both
        init_parameters_(net, generator(0, "bench-net", rep))
        t = reference_outer_step(net, images, image_opt, real_x, inner, generator(0, "bench-inner", rep))
        init_parameters_(ours.net, ours.rng("net", rep))
        ours.net.requires_grad_(True)
        start = time.perf_counter()
        ours.outer_step(rep, 0)
        ours_s = time.perf_counter() - start
        print(f"rep {rep}: reference {sum(t.values()):.2f} s (inner {t['inner_s']:.2f}), ddlib {ours_s:.2f} s",
              flush=True)
        if rep:  # the first is a warm-up
            times["reference"].append(sum(t.values()))
            times["reference_inner"].append(t["inner_s"])
            times["ddlib"].append(ours_s)
    medians = {k: statistics.median(v) for k, v in times.items()}
    report = {"dataset": args.dataset, "ipc": args.ipc, "batch_real": args.batch_real, "inner_epochs": inner,
              "threads": args.threads, "cpu": cpu_name(), "environment": environment(),
              "seconds_per_outer_step": times, "median": medians,
              "ratio_ddlib_to_reference": medians["ddlib"] / medians["reference"]}
    path = Path(args.out) / f"dc-reference-ipc{args.ipc}-cpu.json"
    save_json(report, path)
    print(f"median s/outer step: reference {medians['reference']:.2f}, ddlib {medians['ddlib']:.2f} "
          f"(ratio {report['ratio_ddlib_to_reference']:.2f}) -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
