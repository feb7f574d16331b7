"""DATM: difficulty-aligned trajectory matching (Guo et al., ICLR 2024; algorithms.md section 7).

MTT plus: (1) a start-epoch window [min_start_epoch, upper) whose upper end grows from
``current_max_start_epoch`` to ``max_start_epoch`` over ``expansion_end_epoch`` iterations (early
trajectories for small sets, later ones as the set learns); (2) images initialised from real samples
an expert classifies correctly; (3) soft labels: logits initialised as the mean of the experts' final
logits over the experts that classify the image correctly, learned by SGD (lr_y, momentum 0.9), used
through softmax(logits / temperature) in the student's soft cross-entropy; (4) an iteration whose
loss exceeds ``threshold`` updates nothing.

The synthetic set stores ``logits / temperature`` as its labels, so the standard evaluation (soft
cross-entropy on softmax(labels), ``ddlib.evaluate``) trains on exactly the targets used here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ddlib.methods.mtt import MTT, MTTConfig
from ddlib.methods.registry import register_method
from ddlib.synset import SyntheticSet

__all__ = ["DATMConfig", "DATM", "soft_cross_entropy"]


@dataclass
class DATMConfig(MTTConfig):
    """DATM's settings; defaults are the official utils/cfg.py's (per-setting yaml values in algorithms.md)."""

    iterations: int = 10000          # outer iterations
    init: str = "correct"            # samples_predicted_correctly (by expert 0 at its final epoch)
    syn_steps: int = 80              # N
    expert_epochs: int = 2           # M
    min_start_epoch: int = 0         # T-: lower end of the start-epoch window
    current_max_start_epoch: int = 20  # T: upper end of the window at iteration 0
    max_start_epoch: int = 25        # T+: upper end once the window is fully expanded
    sequential: bool = True          # Sequential_Generation: widen the window from T to T+ over iterations
    expansion_end_epoch: int = 3000  # iteration at which the window reaches T+
    lr_y: float = 2.0                # SGD lr of the soft-label logits
    momentum_y: float = 0.9          # SGD momentum of the soft-label logits
    learn_labels: bool = True        # learn the soft labels (False: keep the experts' logits)
    temperature: float = 1.0         # soft targets are softmax(logits / temperature)
    threshold: float = 1.0           # skip the update of an iteration whose matching loss exceeds this


def soft_cross_entropy(logits: Tensor, target_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """-sum_k softmax(target_logits / T)_k * log_softmax(logits)_k, averaged over the batch [B, K] -> scalar."""
    return -(torch.softmax(target_logits / temperature, dim=1) * logits.log_softmax(dim=1)).sum(dim=1).mean()


@register_method("datm")
class DATM(MTT):
    name = "datm"
    Config = DATMConfig
    state_attrs = (*MTT.state_attrs, "label_logits", "label_optimizer")
    eval_batch = 128

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        self.label_logits = self.expert_logits().requires_grad_(cfg.learn_labels)
        self.label_optimizer = torch.optim.SGD([self.label_logits], lr=cfg.lr_y, momentum=cfg.momentum_y)

    def _check_window(self) -> None:
        super()._check_window()
        cfg = self.cfg
        if not cfg.min_start_epoch < cfg.current_max_start_epoch <= cfg.max_start_epoch:
            raise ValueError(f"need min_start_epoch < current_max_start_epoch <= max_start_epoch, got "
                             f"{cfg.min_start_epoch}, {cfg.current_max_start_epoch}, {cfg.max_start_epoch}")

    @torch.no_grad()
    def expert_logits(self) -> Tensor:
        """Initial soft labels [N, K]: per image, the mean final-epoch logits of the experts that classify it
        correctly (of all experts when none does)."""
        n, k = self.images.shape[0], self.num_classes
        correct_sum = torch.zeros(n, k, device=self.device)
        every_sum = torch.zeros(n, k, device=self.device)
        count = torch.zeros(n, 1, device=self.device)
        for e in range(len(self.experts)):
            params = self.experts.final(e).to(self.device)
            z = torch.cat([self.flat(params, part) for part in self.images.detach().split(256)]).float()
            right = (z.argmax(dim=1) == self.labels).float().unsqueeze(1)
            correct_sum += z * right
            every_sum += z
            count += right
        return torch.where(count > 0, correct_sum / count.clamp_min(1), every_sum / len(self.experts))

    def upper_start_epoch(self, iteration: int) -> int:
        cfg = self.cfg
        if not cfg.sequential:
            return cfg.max_start_epoch
        grown = cfg.current_max_start_epoch + int((cfg.max_start_epoch - cfg.current_max_start_epoch)
                                                  * iteration / max(cfg.expansion_end_epoch, 1))
        return min(grown, cfg.max_start_epoch)

    def inner_loss(self, logits: Tensor, idx: Tensor) -> Tensor:
        return soft_cross_entropy(logits, self.label_logits[idx], self.cfg.temperature)

    def learnables(self) -> list[tuple[torch.optim.Optimizer, Tensor]]:
        pairs = super().learnables()
        return pairs + [(self.label_optimizer, self.label_logits)] if self.cfg.learn_labels else pairs

    def accept(self, loss: Tensor) -> bool:
        return math.isinf(self.cfg.threshold) or bool(loss <= self.cfg.threshold)  # one host sync per iteration

    def step(self, iteration: int) -> dict[str, Tensor]:
        scalars = super().step(iteration)
        scalars["skipped"] = (scalars["loss"] > self.cfg.threshold).float()
        return scalars

    def synthetic_set(self) -> SyntheticSet:
        synset = super().synthetic_set()
        synset.labels = (self.label_logits.detach() / self.cfg.temperature).cpu().clone()
        synset.meta["soft_labels"] = {"temperature": self.cfg.temperature, "learned": self.cfg.learn_labels,
                                      "stored": "logits / temperature; evaluation trains on their softmax"}
        return synset
