"""DM's iteration, ddlib vs the official code's loop, timed side by side on the same CPU.

    python -m bench.dm_reference [--ipc 10] [--batch-real 256] [--repeats 5] [--threads 1]
                                 [--data-root ../shared/data] [--out results/bench]
                                 [--accuracy-iterations K --eval-epochs 300 --num-eval 5]

The official DM (VICO-UoE/DatasetCondensation, main_DM.py) is not vendored here; ``reference_iteration``
re-states its iteration in plain PyTorch: a fresh frozen ConvNet, then for each class in turn 256 random real
images and the class's synthetic images through one shared DSA draw, the real embedding detached, the squared
distance between the two mean embeddings added to one loss; one backward through all classes, one SGD step of
the images (lr 1, momentum 0.5). Its DSA is ddlib's (same operations, one draw per class as the official seed
per class gives), so the ratio measures the loop, not the augmentation code. ddlib's ``DM.step`` does the same
work (same network, same FLOPs). Both run alternately in one process on the same threads, so load on the other
core hits both alike (``bench.side_by_side``). Writes ``<out>/dm-reference-ipc<IPC>[-acc<K>]-cpu.json`` and
prints the medians; with ``--accuracy-iterations K`` both sides run K iterations from the same initial images
and both results are evaluated with the same seeds. Not run by the tests.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from bench import side_by_side


def reference_iteration(net: nn.Module, images: Tensor, image_opt: torch.optim.Optimizer, real, batch_real: int,
                        dsa, rng: torch.Generator) -> None:
    """One DM iteration the official way on the (freshly initialised) ``net``: images [K * ipc, C, H, W]
    (class-major), updated in place by ``image_opt``."""
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


def main(argv: list[str] | None = None) -> int:
    args = side_by_side.parser("python -m bench.dm_reference", __doc__, unit="iteration", repeats=5).parse_args(argv)
    torch.set_num_threads(args.threads)

    from ddlib.data import load_dataset
    from ddlib.methods import make_config
    from ddlib.methods.registry import get_method
    from ddlib.models import get_network, init_parameters_
    from ddlib.rng import generator
    from ddlib.utils import resolve_device

    device = resolve_device(args.device)
    real = load_dataset(args.dataset, args.data_root, device=device)
    cfg = make_config("dm", ipc=args.ipc, batch_real=args.batch_real, precision=args.precision)
    ours = get_method("dm")(real, cfg, seed=0, device=device)
    net = get_network(cfg.model, real.channels, real.num_classes, real.image_size, device=device)
    net.requires_grad_(False).train()
    images = ours.images.detach().clone().requires_grad_(True)  # both sides start from the same images
    image_opt = torch.optim.SGD([images], lr=cfg.lr_img, momentum=0.5)

    def reference(rep: int) -> None:
        init_parameters_(net, generator(0, "bench-net", rep))
        rng = generator(0, "bench-iteration", rep)
        reference_iteration(net, images, image_opt, real, args.batch_real, ours.dsa, rng)

    times = side_by_side.time_alternately({"reference": reference, "ddlib": ours.step},
                                          args.accuracy_iterations or args.repeats + 1, device=device)
    report = {"dataset": args.dataset, "device": str(device), "ipc": args.ipc, "batch_real": args.batch_real,
              "threads": args.threads,
              "precision": args.precision, "dsa_strategy": ours.dsa.strategy if ours.dsa else None}
    side_by_side.finish(args, report, times, name="dm", unit="iteration", ours=ours, reference_images=images,
                        real=real)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
