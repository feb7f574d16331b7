"""DC's outer step, ddlib vs the official code's loop, timed side by side on the same CPU.

    python -m bench.dc_reference [--ipc 10] [--repeats 3] [--threads 1] [--data-root ../shared/data]
                                 [--out results/bench] [--init noise]
                                 [--accuracy-iterations K --eval-protocol dc-aug --eval-epochs 1000]

The official DC (VICO-UoE/DatasetCondensation, main.py) is not vendored here; ``reference_outer_step``
re-states its outer step in plain PyTorch: for each class in turn, the real gradient (256 images) and the
synthetic one (``create_graph``), the layer-wise distance summed over classes, one SGD step of the images
(lr 0.1, momentum 0.5), then ``inner`` epochs of SGD (lr 0.01) on the synthetic set in one batch, as its
``epoch('train', ...)`` does for 100 images with batch 256. ddlib's ``DC.outer_step`` does the same work
(same network, same FLOPs). Both run on the same thread count in the same process, alternately, so load on
the other core affects both alike (``bench.side_by_side``). Writes ``<out>/dc-reference-ipc<IPC>[-acc<K>]-cpu.json``
and prints the medians. With ``--accuracy-iterations K`` both sides run K whole iterations (a fresh network,
``outer`` outer steps on fresh real batches) from the same initial images, and both results are evaluated with
the same seeds. Not run by the tests.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench import side_by_side


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
        y_real = torch.full((real_x.shape[1],), c, device=images.device)
        g_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(real_x[c]), y_real), params)]
        y_syn = torch.full((ipc,), c, device=images.device)
        g_syn = torch.autograd.grad(F.cross_entropy(net(images[c * ipc:(c + 1) * ipc]), y_syn), params,
                                    create_graph=True)
        loss = loss + layerwise_distance(list(g_syn), g_real)
    image_opt.zero_grad()
    loss.backward()
    image_opt.step()
    matched = time.perf_counter()
    net_opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = images.detach().clone(), torch.arange(k, device=images.device).repeat_interleave(ipc)
    for _ in range(inner):
        order = torch.randperm(x.shape[0], generator=rng).to(images.device)
        net_opt.zero_grad()
        F.cross_entropy(net(x[order]), y[order]).backward()
        net_opt.step()
    return {"matching_s": matched - start, "inner_s": time.perf_counter() - matched}


def reference_iteration(net: nn.Module, images: Tensor, image_opt: torch.optim.Optimizer, real, batch_real: int,
                        outer: int, inner: int, rng: torch.Generator) -> dict[str, float]:
    """One official iteration on the freshly initialised ``net``: ``outer`` outer steps, each on a fresh real
    batch per class, with ``inner`` epochs of training after all but the last. Returns the parts' seconds."""
    parts = {"matching_s": 0.0, "inner_s": 0.0}
    for o in range(outer):
        real_x = real.sample_per_class(batch_real, rng)
        for key, seconds in reference_outer_step(net, images, image_opt, real_x, inner if o < outer - 1 else 0,
                                                 rng).items():
            parts[key] += seconds
    return parts


def main(argv: list[str] | None = None) -> int:
    p = side_by_side.parser("python -m bench.dc_reference", __doc__, unit="outer step", repeats=3)
    p.add_argument("--init", default="noise", help="initial images of both sides (DC's default: noise)")
    p.add_argument("--class-grads", default="loop",
                   help="ddlib's per-class gradients: loop (fastest on a CPU) | batched (vmap) | auto")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from ddlib.data import load_dataset
    from ddlib.methods import make_config
    from ddlib.methods.registry import get_method
    from ddlib.models import get_network, init_parameters_
    from ddlib.rng import generator
    from ddlib.utils import resolve_device

    device = resolve_device(args.device)
    real = load_dataset(args.dataset, args.data_root, device=device)
    cfg = make_config("dc", ipc=args.ipc, batch_real=args.batch_real, init=args.init, class_grads=args.class_grads,
                      precision=args.precision)
    ours = get_method("dc")(real, cfg, seed=0, device=device)
    outer, inner = ours.outer, ours.inner
    net = get_network(cfg.model, real.channels, real.num_classes, real.image_size, device=device)
    images = ours.images.detach().clone().requires_grad_(True)  # both sides start from the same images
    image_opt = torch.optim.SGD([images], lr=cfg.lr_img, momentum=0.5)
    whole = bool(args.accuracy_iterations)  # accuracy mode times whole iterations, timing mode one outer step

    def reference(rep: int) -> dict[str, float]:
        init_parameters_(net, generator(0, "bench-net", rep))
        rng = generator(0, "bench-iteration", rep)
        if whole:
            return reference_iteration(net, images, image_opt, real, args.batch_real, outer, inner, rng)
        real_x = real.sample_per_class(args.batch_real, rng)
        return reference_outer_step(net, images, image_opt, real_x, inner if outer > 1 else 0, rng)

    def ddlib_outer_step(rep: int) -> None:
        init_parameters_(ours.net, ours.rng("net", rep))
        ours.net.requires_grad_(True)
        ours.outer_step(rep, 0)

    unit = "iteration" if whole else "outer step"
    times = side_by_side.time_alternately({"reference": reference, "ddlib": ours.step if whole else ddlib_outer_step},
                                          args.accuracy_iterations or args.repeats + 1, device=device)
    report = {"dataset": args.dataset, "device": str(device), "class_grads": args.class_grads, "ipc": args.ipc,
              "batch_real": args.batch_real, "init": args.init,
              "outer_steps": outer, "inner_epochs": inner, "threads": args.threads, "precision": args.precision}
    side_by_side.finish(args, report, times, name="dc", unit=unit, ours=ours, reference_images=images, real=real)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
