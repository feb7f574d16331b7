"""DataDAM's iteration, ddlib vs the official code's loop, timed side by side on the same CPU.

    python -m bench.datadam_reference [--ipc 10] [--batch-real 64] [--repeats 5] [--threads 1]
                                      [--data-root ../shared/data] [--out results/bench]
                                      [--accuracy-iterations K --eval-epochs 300 --num-eval 5]

The official DataDAM (DataDistillation/DataDAM, main_DataDAM.py; algorithms.md section 5) is not vendored here;
``reference_iteration`` re-states its iteration in plain PyTorch: a fresh frozen ConvNet with forward hooks on
every ReLU; for each class its 64 real images and its synthetic images through one shared DSA draw; all real
images concatenated into one batch and all synthetic images into another, each through the network in one
pass; the attention maps ``normalise(sum_ch |F|^p)`` (``abs().pow(p)``, as its ``get_attention``) of every
ReLU output but the last and the embeddings matched by class means (SAM + lambda * MMD, both x100); one SGD step
of the images (lr 1, momentum 0.5). The network and the DSA are ddlib's (the paper's InstanceNorm ConvNet and p
= 4, ddlib's defaults; the released code uses BatchNorm and p = 1), so the ratio measures the loop and the
passes (``--norm batch --power 1`` times the released code's settings). ddlib's ``DataDAM.step`` does the same
work. Both run alternately in one process on the same threads (``bench.side_by_side``). Writes
``<out>/datadam[-power<p>][-<norm>]-reference-ipc<IPC>[-acc<K>][-<precision>]-cpu.json``. Not run by the tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench import side_by_side


def relu_outputs(net: nn.Module) -> list[Tensor]:
    """A list that forward hooks on every ``nn.ReLU`` of ``net`` fill with their outputs, as the official code
    collects its attention maps; clear it before each pass."""
    outputs: list[Tensor] = []
    for module in net.modules():
        if isinstance(module, nn.ReLU):
            module.register_forward_hook(lambda _module, _inputs, output: outputs.append(output))
    return outputs


def official_attention(feature: Tensor, power: float) -> Tensor:
    """The released ``get_attention``: [B, C, H, W] -> [B, H*W], ``sum_c |F|^p`` with ``pow``, rows L2-normalised."""
    return F.normalize(feature.abs().pow(power).sum(dim=1).flatten(1), p=2, dim=1)


def class_mean_distance(real: Tensor, syn: Tensor, num_classes: int) -> Tensor:
    """The official ``MSE_B``: sum over classes of the squared distance of the class means ([K * n, D] inputs)."""
    return (real.view(num_classes, -1, real.shape[1]).mean(1) - syn.view(num_classes, -1, syn.shape[1]).mean(1)
            ).pow(2).sum()


def reference_loss(net: nn.Module, activations: list[Tensor], all_real: Tensor, all_syn: Tensor, num_classes: int,
                   power: float, mmd_weight: float) -> Tensor:
    """SAM + MMD the official way: real [K * n, ...] and synthetic [K * ipc, ...] images (class-major), each
    through ``net`` (hooked by ``relu_outputs`` into ``activations``) in one pass."""
    activations.clear()
    emb_real = net.embed(all_real).detach()
    maps_real = [a.detach() for a in activations]
    activations.clear()
    emb_syn = net.embed(all_syn)
    maps_syn = list(activations)
    loss = sum(100 * class_mean_distance(official_attention(r, power), official_attention(s, power), num_classes)
               for r, s in zip(maps_real[:-1], maps_syn[:-1]))
    return loss + 100 * mmd_weight * class_mean_distance(emb_real, emb_syn, num_classes)


def reference_iteration(net: nn.Module, activations: list[Tensor], images: Tensor, image_opt: torch.optim.Optimizer,
                        real, batch_real: int, dsa, power: float, mmd_weight: float, rng: torch.Generator) -> None:
    """One DataDAM iteration the official way on the freshly initialised ``net``: images [K * ipc, C, H, W]
    (class-major), one shared DSA draw per class, updated in place by ``image_opt``."""
    k = real.num_classes
    ipc = images.shape[0] // k
    real_x = real.sample_per_class(batch_real, rng)
    pairs = [dsa.siamese(real_x[c:c + 1], images[c * ipc:(c + 1) * ipc].unsqueeze(0), rng) for c in range(k)]
    loss = reference_loss(net, activations, torch.cat([r[0] for r, _ in pairs]), torch.cat([s[0] for _, s in pairs]),
                          k, power, mmd_weight)
    image_opt.zero_grad()
    loss.backward()
    image_opt.step()


def main(argv: list[str] | None = None) -> int:
    p = side_by_side.parser("python -m bench.datadam_reference", __doc__, unit="iteration", repeats=5)
    p.add_argument("--power", type=float, default=None, help="attention power p (default ddlib's: 4, the paper)")
    p.add_argument("--norm", default=None, help="instance (default, the paper) | batch (the released code)")
    p.set_defaults(batch_real=64)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from ddlib.data import load_dataset
    from ddlib.methods import make_config
    from ddlib.methods.datadam import _build_network
    from ddlib.methods.registry import get_method
    from ddlib.models import init_parameters_
    from ddlib.rng import generator
    from ddlib.utils import resolve_device

    device = resolve_device(args.device)
    real = load_dataset(args.dataset, args.data_root, device=device)
    overrides = {k: v for k, v in (("power", args.power), ("norm", args.norm)) if v is not None}
    cfg = make_config("datadam", ipc=args.ipc, batch_real=args.batch_real, precision=args.precision,
                      **overrides)
    ours = get_method("datadam")(real, cfg, seed=0, device=device)
    net = _build_network(cfg, real.channels, real.num_classes, real.image_size, device)
    net.requires_grad_(False).train()
    activations = relu_outputs(net)
    images = ours.images.detach().clone().requires_grad_(True)  # both sides start from the same images
    image_opt = torch.optim.SGD([images], lr=cfg.lr_img, momentum=0.5)

    def reference(rep: int) -> None:
        init_parameters_(net, generator(0, "bench-net", rep))
        reference_iteration(net, activations, images, image_opt, real, args.batch_real, ours.dsa, cfg.power,
                            cfg.mmd_weight, generator(0, "bench-iteration", rep))

    times = side_by_side.time_alternately({"reference": reference, "ddlib": ours.step},
                                          args.accuracy_iterations or args.repeats + 1, device=device)
    report = {"dataset": args.dataset, "device": str(device), "ipc": args.ipc, "batch_real": args.batch_real,
              "threads": args.threads,
              "precision": args.precision, "power": cfg.power, "mmd_weight": cfg.mmd_weight, "norm": cfg.norm,
              "dsa_strategy": ours.dsa.strategy if ours.dsa else None}
    name = "datadam" + "".join(f"-{k}{v:g}" if k == "power" else f"-{v}" for k, v in overrides.items())
    side_by_side.finish(args, report, times, name=name, unit="iteration", ours=ours, reference_images=images,
                        real=real)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
