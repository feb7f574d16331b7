"""DM's iteration, ddlib vs the official code's loop, timed side by side on the same CPU.

    python -m bench.dm_reference [--ipc 10] [--batch-real 256] [--repeats 5] [--threads 1]
                                 [--data-root ../shared/data] [--out results/bench]

The official DM (VICO-UoE/DatasetCondensation, main_DM.py) is not vendored here; ``reference_iteration``
re-states its iteration in plain PyTorch: a fresh frozen ConvNet, then for each class in turn 256 random real
images and the class's synthetic images through one shared DSA draw, the real embedding detached, the squared
distance between the two mean embeddings added to one loss; one backward through all classes, one SGD step of
the images (lr 1, momentum 0.5). Its DSA is ddlib's (same operations, one draw per class as the official seed
per class gives), so the ratio measures the loop, not the augmentation code. ddlib's ``DM.step`` does the same
work (same network, same FLOPs). Both run alternately in one process on the same threads, so load on the other
core hits both alike. Writes ``<out>/dm-reference-ipc<IPC>-cpu.json`` and prints the medians. Not run by the
tests.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn


def reference_iteration(net: nn.Module, images: Tensor, image_opt: torch.optim.Optimizer, real, batch_real: int,
                        dsa, rng: torch.Generator) -> float:
    """One DM iteration the official way: images [K * ipc, C, H, W] (class-major). Returns its seconds."""
    start = time.perf_counter()
    k = real.num_classes
    ipc = images.shape[0] // k
    real_x = real.sample_per_class(batch_real, rng)  # the official get_images(c, n), for all classes at once
    loss = images.new_zeros(())
    for c in range(k):
        img_real, img_syn = real_x[c:c + 1], images[c * ipc:(c + 1) * ipc].unsqueeze(0)
        img_real, img_syn = dsa.siamese(img_real, img_syn, rng)  # one draw shared by the class's two batches
        output_real = net.embed(img_real[0]).detach()
        output_syn = net.embed(img_syn[0])
        loss = loss + ((output_real.mean(dim=0) - output_syn.mean(dim=0)) ** 2).sum()
    image_opt.zero_grad()
    loss.backward()
    image_opt.step()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dm_reference", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5, help="timed iterations of each (after one warm-up)")
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
    cfg = make_config("dm", ipc=args.ipc, batch_real=args.batch_real)
    ours = get_method("dm")(real, cfg, seed=0)
    net = get_network(cfg.model, real.channels, real.num_classes, real.image_size).requires_grad_(False).train()
    images = ours.images.detach().clone().requires_grad_(True)
    image_opt = torch.optim.SGD([images], lr=cfg.lr_img, momentum=0.5)
    times: dict[str, list[float]] = {"ddlib": [], "reference": []}
    for rep in range(args.repeats + 1):  # alternate, so a change in load hits both
        init_parameters_(net, generator(0, "bench-net", rep))
        ref_s = reference_iteration(net, images, image_opt, real, args.batch_real, ours.dsa,
                                    generator(0, "bench-iteration", rep))
        start = time.perf_counter()
        ours.step(rep)
        ours_s = time.perf_counter() - start
        print(f"rep {rep}: reference {ref_s:.2f} s, ddlib {ours_s:.2f} s", flush=True)
        if rep:  # the first is a warm-up
            times["reference"].append(ref_s)
            times["ddlib"].append(ours_s)
    medians = {k: statistics.median(v) for k, v in times.items()}
    report = {"dataset": args.dataset, "ipc": args.ipc, "batch_real": args.batch_real, "threads": args.threads,
              "dsa_strategy": ours.dsa.strategy if ours.dsa else None, "cpu": cpu_name(),
              "environment": environment(), "seconds_per_iteration": times, "median": medians,
              "ratio_ddlib_to_reference": medians["ddlib"] / medians["reference"]}
    path = Path(args.out) / f"dm-reference-ipc{args.ipc}-cpu.json"
    save_json(report, path)
    print(f"median s/iteration: reference {medians['reference']:.2f}, ddlib {medians['ddlib']:.2f} "
          f"(ratio {report['ratio_ddlib_to_reference']:.2f}) -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
