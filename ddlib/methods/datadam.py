"""DataDAM: attention matching (Sajedi et al., ICCV 2023; reference: algorithms.md section 5).

Each iteration draws a fresh, frozen, randomly initialised network and takes ONE SGD step on the
synthetic images so that, class by class, they match a batch of real images (both seen through the same
siamese DSA transform) in two ways:

* SAM: the class-mean spatial attention map of every block but the last,
  ``A(F) = l2normalise(flatten(sum_channels |F|^p))``, loss ``100 * sum_layers sum_c ||mean A_real - mean A_syn||^2``;
* MMD: the class-mean embedding (the last layer's features), loss
  ``100 * lambda * sum_c ||mean e_real - mean e_syn||^2``.

There is no inner network training. The course's Table 1 (ECE1512 Project A, course.md 1.4) was written
for gradient matching (DC); read for DataDAM its symbols mean:

    symbol          Table 1 (MNIST / MHIST)   DataDAM meaning
    K               100 / 200                 iterations (one fresh random network each)
    T               10                        DC's outer loop; DataDAM has none (NOT the iteration count)
    eta_S           0.1                       lr_img
    zeta_S          1                         one image step per network (what every iteration does)
    eta_theta       0.01                      lr of the *evaluation* network, not used here
    zeta_theta      50                        DC's inner network steps; no role in DataDAM
    minibatch       256 / 128                 batch_real (real images per class per iteration)
    lambda          ~0.01                     mmd_weight

Presets (``make_config("datadam", preset=...)``): ``course`` is Table 1 for MNIST (pass
``--iterations 200 --batch-real 128 --ipc 50`` for MHIST); ``paper`` is the paper's table (8000
iterations, p = 4, InstanceNorm); ``released`` is the released code (p = 1, BatchNorm ConvNet, 20000
iterations).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddlib.methods.base import DistillConfig, Distiller
from ddlib.methods.registry import register_method
from ddlib.models import compile_network, get_network, has_batchnorm, init_parameters_

__all__ = ["DataDAMConfig", "DataDAM", "attention_map", "class_means", "sam_loss", "mmd_loss"]

DEFAULT_NORM = "instance"


@dataclass
class DataDAMConfig(DistillConfig):
    """DataDAM's settings; defaults are the paper's hyper-parameter table (HPTable.png)."""

    iterations: int = 8000           # paper (the released code's default is 20000)
    lr_img: float = 1.0              # paper: 1 for IPC <= 50, 10 above
    batch_real: int = 64             # real images per class per iteration (released code)
    init: str = "real"               # the official default
    power: float = 4.0               # p of the attention map; paper 4, the released code uses 1
    mmd_weight: float = 0.01         # lambda; the paper uses 0.02 at high resolution (>= 128 px): set it there
    norm: str = DEFAULT_NORM         # the matching network's norm; paper: instance, released code: batch


def attention_map(feature: Tensor, power: float) -> Tensor:
    """Spatial attention [B, C, H, W] -> [B, H*W]: ``sum_c |F|^p`` flattened, every row L2-normalised.

    ``|F|^p`` stays in the map's dtype (bf16 under autocast: no full-size cast) and is summed in fp32."""
    return F.normalize(_abs_power(feature, power).sum(dim=1, dtype=torch.float32).flatten(1), dim=1)


def _abs_power(x: Tensor, power: float) -> Tensor:
    """``|x|^p``; p = 1, 2 and 4 by multiplication, several times faster than ``pow`` on large maps."""
    if power == 1:
        return x.abs()
    if power in (2, 4):
        squared = x * x
        if power == 2:
            return squared
        # Without autograd (the real pass) square in place: one full-size temporary fewer.
        return squared * squared if torch.is_grad_enabled() else squared.mul_(squared)
    return x.abs().pow(power)


def class_means(x: Tensor, num_classes: int) -> Tensor:
    """[K * n, ...] ordered by class -> the per-class means [K, ...]."""
    return x.view(num_classes, -1, *x.shape[1:]).mean(dim=1)


def sam_loss(real_maps: list[Tensor], syn_maps: list[Tensor]) -> Tensor:
    """``sum_layers 100 * sum_c ||real - syn||^2`` over class-mean attention maps, each [K, h*w]."""
    return sum((100 * (r - s).pow(2).sum() for r, s in zip(real_maps, syn_maps, strict=True)),
               start=syn_maps[0].new_zeros(()) if syn_maps else torch.zeros(()))


def mmd_loss(real_mean: Tensor, syn_mean: Tensor, weight: float) -> Tensor:
    """``100 * weight * sum_c ||real - syn||^2`` over class-mean embeddings [K, D] (linear-kernel MMD)."""
    return 100 * weight * (real_mean - syn_mean).pow(2).sum()


@torch.no_grad()
def _real_statistics(net: nn.Module, x: Tensor, num_classes: int, chunk: int,
                     power: float, whole: bool | None = None) -> tuple[list[Tensor], Tensor]:
    """Class-mean attention maps ([K, h*w] per block but the last) and embeddings [K, D] of real
    images x [K * n, C, H, W] ordered by class, without gradients.

    The big block maps are reduced to class means right away. Nets without BatchNorm go in chunks of
    ``chunk`` images (the first block's maps stay in cache: much faster on a CPU), accumulating class
    sums; BatchNorm nets see the whole batch at once, since their statistics depend on it. ``whole``
    (default: ``chunk`` covers x) chooses one pass.
    """
    if has_batchnorm(net) or (chunk >= x.shape[0] if whole is None else whole):
        maps, embedding = net.block_outputs(x)
        return ([class_means(attention_map(m, power), num_classes) for m in maps[:-1]],
                class_means(embedding.float(), num_classes))
    per_class = x.shape[0] // num_classes
    labels = torch.arange(num_classes, device=x.device).repeat_interleave(per_class)
    map_sums: list[Tensor] = []
    embed_sum: Tensor | None = None
    for part, part_labels in zip(x.split(chunk), labels.split(chunk)):
        maps, embedding = net.block_outputs(part)
        attention = [attention_map(m, power) for m in maps[:-1]]
        if embed_sum is None:
            map_sums = [a.new_zeros(num_classes, a.shape[1]) for a in attention]
            embed_sum = embedding.new_zeros(num_classes, embedding.shape[1], dtype=torch.float32)
        for total, a in zip(map_sums, attention):
            total.index_add_(0, part_labels, a)
        embed_sum.index_add_(0, part_labels, embedding.float())
    return [s / per_class for s in map_sums], embed_sum / per_class


def _build_network(cfg: DataDAMConfig, channels: int, num_classes: int, image_size: int,
                   device: torch.device) -> nn.Module:
    """``cfg.model`` with ``cfg.norm``. A model without a norm setting (mlp, lenet) is built as it is
    when norm is left at its default; a model name that fixes a norm (convnetbn) must agree with it."""
    from ddlib.models import _lookup  # the name's own fields, to refuse a silent contradiction

    norm = cfg.norm.lower().removesuffix("norm")
    fixed = getattr(_lookup(cfg.model), "keywords", {}).get("norm")
    if fixed is not None and fixed != norm:
        raise ValueError(f"model {cfg.model!r} fixes norm={fixed!r} but DataDAM's norm is {cfg.norm!r}; "
                         f"pass --norm {fixed}, or a model name without a norm suffix")
    try:
        return get_network(cfg.model, channels, num_classes, image_size, device=device, norm=norm)
    except TypeError:
        if norm != DEFAULT_NORM:
            raise ValueError(f"model {cfg.model!r} has no norm setting; leave norm at {DEFAULT_NORM!r}") from None
        return get_network(cfg.model, channels, num_classes, image_size, device=device)


@register_method("datadam")
class DataDAM(Distiller):
    name = "datadam"
    Config = DataDAMConfig
    shardable = True
    compilable = True
    PRESETS: ClassVar[dict[str, dict]] = {
        # Table 1 of the course for MNIST (K = 100 networks, eta_S = 0.1, minibatch 256, 10 images/class).
        # MHIST: K = 200 and minibatch 128, i.e. --iterations 200 --batch-real 128 --ipc 50.
        "course": dict(iterations=100, lr_img=0.1, batch_real=256, ipc=10, mmd_weight=0.01, momentum_img=0.5),
        # The paper's table (lambda 0.02 at >= 128 px: add --mmd-weight 0.02 there).
        "paper": dict(iterations=8000, lr_img=1.0, mmd_weight=0.01, power=4.0, norm="instance"),
        # The released main_DataDAM.py: get_attention(p=1), a BatchNorm ConvNet, Iteration 20000.
        "released": dict(iterations=20000, lr_img=1.0, batch_real=64, mmd_weight=0.01, power=1.0, norm="batch"),
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        real = self.real
        # One module, re-initialised every iteration: the same draws as a fresh network, without rebuilding it.
        self.net = _build_network(self.cfg, real.channels, real.num_classes, real.image_size, self.device)
        if self.cfg.compile:
            compile_network(self.net)
        self.net.requires_grad_(False)
        self.net.train()  # BatchNorm nets normalise with batch statistics, as the official code does
        if has_batchnorm(self.net):
            self.unshard("the BatchNorm statistics couple all classes")

    def real_statistics(self, net: nn.Module, real_x: Tensor) -> tuple[list[Tensor], Tensor]:
        """Class-mean attention maps ([k, h*w] per block but the last) and embeddings [k, D] of real
        images [k, n, C, H, W] (k: all classes, or a rank's share), without gradients.

        Whether the pass is chunked is decided for all K classes, so that a rank sums as a single process.
        """
        chunk = self.chunk_size(self.num_classes * real_x.shape[1])
        whole = chunk >= self.num_classes * real_x.shape[1]
        with self.autocast():
            return _real_statistics(net, real_x.flatten(0, 1), real_x.shape[0], chunk, self.cfg.power, whole)

    def class_loss(self, net: nn.Module, real_stats: tuple[list[Tensor], Tensor], syn_part: Tensor,
                   classes: slice) -> dict[str, Tensor]:
        """SAM + MMD of the classes ``classes`` with synthetic images ``syn_part`` [k, ipc, C, H, W]."""
        cfg, k = self.cfg, syn_part.shape[0]
        real_maps, real_mean = real_stats
        maps, embedding = net.block_outputs(syn_part.flatten(0, 1))
        syn_maps = [class_means(attention_map(m, cfg.power), k) for m in maps[:-1]]
        sam = sam_loss([r[classes] for r in real_maps], syn_maps)
        mmd = mmd_loss(real_mean[classes], class_means(embedding.float(), k), cfg.mmd_weight)
        return {"loss": sam + mmd, "sam": sam, "mmd": mmd}

    def loss(self, net: nn.Module, real_x: Tensor, syn_x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, sam, mmd) for real [K, n, C, H, W] and synthetic [K, ipc, C, H, W] images, all classes at once."""
        parts = self.class_loss(net, self.real_statistics(net, real_x), syn_x, slice(None))
        return parts["loss"], parts["sam"], parts["mmd"]

    def step(self, iteration: int) -> dict[str, Tensor]:
        cfg, net = self.cfg, self.net
        init_parameters_(net, self.rng("net", iteration))
        # [k, n, C, H, W] and [k, ipc, C, H, W]: the owned classes (all K in one process)
        real_x, syn_x = self.matching_batches(cfg.batch_real, self.rng("real", iteration), self.rng("dsa", iteration))
        stats = self.real_statistics(net, real_x)
        return self.update_images_by_class(syn_x, lambda part, classes: self.class_loss(net, stats, part, classes),
                                           net)
