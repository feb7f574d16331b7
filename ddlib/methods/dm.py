"""DM: distribution matching (Zhao & Bilen, WACV 2023; reference: algorithms.md section 4).

Each iteration draws a fresh, frozen, randomly initialised network and moves the synthetic images so
that every class's mean embedding matches the mean embedding of a batch of real images of that class,
both seen through the same (siamese) DSA transform. All classes go through the network in one pass
(on a CPU: in cache-sized chunks of classes, with the same result).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ddlib.methods.base import DistillConfig, Distiller
from ddlib.methods.registry import register_method
from ddlib.models import compile_network, get_network, has_batchnorm, init_parameters_

__all__ = ["DMConfig", "DM"]


@dataclass
class DMConfig(DistillConfig):
    """DM's settings; defaults are the official code's (main_DM.py), except iterations (20000 there)."""

    lr_img: float = 1.0              # 1 for IPC <= 50, 10 above (official README)
    batch_real: int = 256            # real images per class per iteration
    init: str = "real"               # the official default


@register_method("dm")
class DM(Distiller):
    name = "dm"
    Config = DMConfig
    shardable = True
    compilable = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        real = self.real
        # One module, re-initialised every iteration: the same draws as a fresh network, without rebuilding it.
        self.net = get_network(self.cfg.model, real.channels, real.num_classes, real.image_size, device=self.device)
        if self.cfg.compile:
            compile_network(self.net)
        self.net.requires_grad_(False)
        self.net.train()  # BatchNorm nets normalise with batch statistics, as the official BN path does
        if has_batchnorm(self.net):
            self.unshard("the BatchNorm statistics couple all classes")

    def step(self, iteration: int) -> dict[str, Tensor]:
        cfg, net = self.cfg, self.net
        init_parameters_(net, self.rng("net", iteration))
        # [k, n, C, H, W] and [k, ipc, C, H, W]: the owned classes (all K in one process)
        real_x, syn_x = self.matching_batches(cfg.batch_real, self.rng("real", iteration), self.rng("dsa", iteration))
        with self.autocast():
            real_mean = self.embed_real(net, real_x.flatten(0, 1)).float().view(*real_x.shape[:2], -1).mean(dim=1)

        def class_loss(syn_part: Tensor, classes: slice) -> dict[str, Tensor]:
            syn_mean = net.embed(syn_part.flatten(0, 1)).float().view(*syn_part.shape[:2], -1).mean(dim=1)
            return {"loss": (real_mean[classes] - syn_mean).pow(2).sum()}

        return self.update_images_by_class(syn_x, class_loss, net)
