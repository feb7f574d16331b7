"""PAD: prioritize alignment in dataset distillation (Li, Guo et al., 2024; algorithms.md section 8).

DATM plus the parameter filter: the matching loss (numerator and denominator) is taken over the deep
part of the flat parameter vector only. ``filter="depth"`` (the paper, Eq. 4) drops the first
floor(drop_ratio * P) entries, cut by count, not at a layer boundary; ``filter="loss"`` (the released
PAD.py) instead drops the drop_ratio fraction of entries whose squared student error is smallest.

The other half of PAD, experts trained on an easy-to-hard schedule of EL2N scores, happens at expert
time: ``ddlib experts --curriculum --optimizer gsam`` (``ddlib.trajectory.ExpertConfig``).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ddlib.methods.datm import DATM, DATMConfig
from ddlib.methods.registry import register_method
from ddlib.synset import SyntheticSet
from ddlib.trajectory import depth_keep, loss_keep, parameter_distance

__all__ = ["PADConfig", "PAD"]

FILTERS = ("depth", "loss")


@dataclass
class PADConfig(DATMConfig):
    """PAD's settings: DATM's, with paper Table 7's CIFAR-10 IPC10 row where it differs."""

    filter: str = "depth"            # depth (paper: drop the shallowest entries) | loss (code: the smallest errors)
    drop_ratio: float = 0.25         # alpha: fraction of the flat parameter vector left out of the loss
    current_max_start_epoch: int = 10  # T (Table 7, CIFAR-10 IPC10)
    max_start_epoch: int = 20        # T+ (Table 7)
    expansion_end_epoch: int = 1000  # the repo yaml's CIFAR-10 IPC10 value
    lr_img: float = 100.0            # Table 7 "lr pixels", CIFAR-10 IPC10


@register_method("pad")
class PAD(DATM):
    name = "pad"
    Config = PADConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.cfg.filter not in FILTERS:
            raise ValueError(f"unknown PAD filter {self.cfg.filter!r}; use depth (paper) or loss (released code)")
        self.depth_cut = depth_keep(self.flat.num_params, self.cfg.drop_ratio)

    def matching_loss(self, student: Tensor, start: Tensor, target: Tensor) -> Tensor:
        if self.cfg.filter == "depth":
            return parameter_distance(student, target, start, self.depth_cut)
        keep = loss_keep((student.detach() - target).pow(2), self.cfg.drop_ratio)
        return parameter_distance(student, target, start, keep)

    def synthetic_set(self) -> SyntheticSet:
        synset = super().synthetic_set()
        cut, layer, seen = self.depth_cut.start, None, 0
        for name, size in zip(self.flat.names, self.flat.sizes):
            if seen + size > cut:
                layer = name
                break
            seen += size
        synset.meta["pad"] = {"filter": self.cfg.filter, "drop_ratio": self.cfg.drop_ratio,
                              "dropped_entries": cut, "num_params": self.flat.num_params,
                              "first_kept_parameter": layer if self.cfg.filter == "depth" else None}
        return synset
