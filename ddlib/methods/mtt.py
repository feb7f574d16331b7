"""MTT: matching training trajectories (Cazenavette et al., CVPR 2022; algorithms.md section 6).

Each iteration picks an expert trajectory and a start epoch t, starts a student at the expert's
parameters theta_t (one flat vector), trains it for ``syn_steps`` plain SGD steps on synthetic
mini-batches with a learnable learning rate, and minimises the normalised distance
||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2 w.r.t. the images and the rate.

The unroll is ``torch.func.functional_call`` over the flat vector with ``torch.autograd.grad(...,
create_graph=True)`` at every step, as the official code: memory grows linearly in syn_steps x batch_syn
(the activations of every step are kept); ``recompute_steps`` bounds it to one step's graph plus N parameter
vectors for ~1.3x the time, redoing each step in the backward (``RecomputedStep``). The learned rate is
``lr_floor * softplus(raw / lr_floor)``: always positive, and moved like the official unconstrained rate while
it is well above ``lr_floor``.

DATM (``datm.py``) and PAD (``pad.py``) subclass this and change the window, the labels and the loss.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ddlib.data import RealSet
from ddlib.evaluate import get_protocol
from ddlib.methods.base import DistillConfig, Distiller
from ddlib.methods.registry import register_method
from ddlib.models import get_network
from ddlib.synset import SyntheticSet
from ddlib.trajectory import Experts, FlatModel, load_experts, parameter_distance

__all__ = ["MTTConfig", "MTT", "RecomputedStep", "positive_lr", "raw_for_lr"]


@dataclass
class MTTConfig(DistillConfig):
    """MTT's settings; defaults are the official distill.py's (CIFAR values per setting in algorithms.md)."""

    iterations: int = 5000           # outer iterations
    init: str = "real"               # real (MTT) | correct (real images an expert classifies right, DATM) | ...
    lr_img: float = 1000.0           # SGD lr of the images (momentum 0.5)
    experts: str = ""                # folder of expert trajectories (`ddlib experts --out DIR`)
    max_experts: int = 0             # experts read from the folder (0 = all)
    syn_steps: int = 20              # N: student steps on the synthetic set per iteration
    expert_epochs: int = 3           # M: the target is the expert M epochs after the start (M snapshots
                                     # for experts saved several times per epoch: `snapshots_per_epoch`)
    min_start_epoch: int = 0         # start epochs are drawn from [min_start_epoch, max_start_epoch - 1]
    max_start_epoch: int = 25        # T+: exclusive upper end of the start epoch
    lr_teacher: float = 0.01         # initial value of the learnable student lr (the experts' lr)
    lr_lr: float = 1e-5              # SGD lr of the learnable student lr (momentum 0.5)
    momentum_lr: float = 0.5         # SGD momentum of the learnable student lr
    lr_floor: float = 1e-4           # student lr = lr_floor * softplus(raw / lr_floor): positive by construction
    batch_syn: int = 0               # synthetic images per student step (0 = all); bounds the memory
    recompute_steps: bool = False    # keep only each student step's parameters and redo its pass in the
                                     # backward: memory ~ N x P floats + one step's graph instead of N steps'
                                     # graphs, ~1.3x the time (RecomputedStep)


def positive_lr(raw: Tensor, floor: float) -> Tensor:
    """The student lr from its raw parameter: ``floor * softplus(raw / floor)`` (> 0; ~raw when raw >> floor)."""
    return F.softplus(raw, beta=1.0 / floor)


def raw_for_lr(lr: float, floor: float) -> float:
    """The raw parameter giving student lr ``lr`` (the inverse of ``positive_lr``, computed stably)."""
    if lr <= 0:
        raise ValueError(f"the student lr must start positive, got lr_teacher={lr}")
    x = lr / floor
    return floor * (x + math.log(-math.expm1(-x)))


@register_method("mtt")
class MTT(Distiller):
    name = "mtt"
    Config = MTTConfig
    state_attrs = (*Distiller.state_attrs, "raw_lr", "lr_optimizer")

    def __init__(self, real: RealSet, cfg: MTTConfig, *, seed: int = 0, device: str | torch.device = "cpu"):
        super().__init__(real, replace(cfg, init="real") if cfg.init == "correct" else cfg, seed=seed, device=device)
        self.cfg = cfg
        self.experts = _load_checked(cfg, real)
        net = get_network(cfg.model, real.channels, real.num_classes, real.image_size, device=self.device)
        self.flat = FlatModel(net.requires_grad_(False))
        self._check_window()
        if cfg.init == "correct":
            self.images = self.correctly_classified(self.rng("init-correct")).requires_grad_(True)
        self.raw_lr = torch.tensor(raw_for_lr(cfg.lr_teacher, cfg.lr_floor), device=self.device, requires_grad=True)
        self.optimizer = torch.optim.SGD([self.images], lr=cfg.lr_img, momentum=cfg.momentum_img)
        self.lr_optimizer = torch.optim.SGD([self.raw_lr], lr=cfg.lr_lr, momentum=cfg.momentum_lr)

    # ------------------------------------------------------------------ pieces subclasses change
    def stalled(self, record: dict[str, float]) -> str | None:
        """A learnable lr driven to ~0 (below lr_floor / 100): the student no longer moves, the loss sits at 1
        and the images get no gradient, so the run would go on without learning (seen with lr_teacher 0.05)."""
        lr = record.get("lr")
        if lr is None or lr >= self.cfg.lr_floor / 100:
            return None
        return (f"the learnable student lr collapsed to {lr:.1e} (it started at lr_teacher {self.cfg.lr_teacher}): "
                f"the student no longer moves; start it lower (--set lr_teacher=...) or lower --set lr_lr "
                f"(now {self.cfg.lr_lr})")

    @property
    def lr(self) -> Tensor:
        """The learnable student lr (a positive scalar tensor)."""
        return positive_lr(self.raw_lr, self.cfg.lr_floor)

    def upper_start_epoch(self, iteration: int) -> int:
        """Exclusive upper end of the start epoch at ``iteration`` (MTT: fixed)."""
        return self.cfg.max_start_epoch

    def inner_loss(self, logits: Tensor, idx: Tensor) -> Tensor:
        """The student's training loss on synthetic images ``idx`` (MTT: CE with the hard labels)."""
        return F.cross_entropy(logits, self.labels[idx])

    def matching_loss(self, student: Tensor, start: Tensor, target: Tensor) -> Tensor:
        """The normalised parameter distance (PAD filters entries here)."""
        return parameter_distance(student, target, start)

    def learnables(self) -> list[tuple[torch.optim.Optimizer, Tensor]]:
        """(optimiser, tensor) pairs updated from the matching loss."""
        return [(self.optimizer, self.images), (self.lr_optimizer, self.raw_lr)]

    def accept(self, loss: Tensor) -> bool:
        """Whether this iteration's update is applied (DATM skips losses above a threshold)."""
        return True

    # ------------------------------------------------------------------ one iteration
    def step(self, iteration: int) -> dict[str, Tensor]:
        cfg = self.cfg
        g = self.rng("draw", iteration)
        expert = int(torch.randint(len(self.experts), (1,), generator=g))
        start_epoch = int(torch.randint(cfg.min_start_epoch, self.upper_start_epoch(iteration), (1,), generator=g))
        trajectory = self.experts[expert]
        start = trajectory[start_epoch].to(self.device, torch.float32)
        target = trajectory[start_epoch + cfg.expert_epochs].to(self.device, torch.float32)
        student = self.unroll(start, self.rng("unroll", iteration))
        loss = self.matching_loss(student, start, target)
        if self.accept(loss):
            pairs = self.learnables()
            grads = torch.autograd.grad(loss, [t for _, t in pairs])
            for (opt, tensor), grad in zip(pairs, grads):
                opt.zero_grad(set_to_none=True)
                tensor.grad = grad
                opt.step()
        return {"loss": loss.detach(), "lr": self.lr.detach(), "start_epoch": torch.tensor(float(start_epoch))}

    def unroll(self, start: Tensor, g: torch.Generator) -> Tensor:
        """``syn_steps`` SGD steps from ``start`` [P] on synthetic mini-batches (DSA, i.i.d. per image);
        differentiable w.r.t. the images, the labels and the lr. Returns the student's parameters [P]."""
        params, lr = start.clone().requires_grad_(True), self.lr
        if self.cfg.recompute_steps:  # the same steps and draws, each step's graph rebuilt in the backward
            leaves = [t for _, t in self.learnables() if t is not self.raw_lr]  # images (DATM: + soft labels)
            for idx in self.batches(g):
                params = RecomputedStep.apply(self, g, idx, params, lr, *leaves)
            return params
        for idx in self.batches(g):
            params = params - lr * self.student_gradient(params, self.step_batch(idx, g), idx)
        return params

    def step_batch(self, idx: Tensor, g: torch.Generator) -> Tensor:
        """The synthetic images ``idx`` [B] of one student step, DSA-augmented with draws from ``g`` [B, C, H, W]."""
        x = self.images[idx]
        return x if self.dsa is None else self.dsa(x, g)

    def student_gradient(self, params: Tensor, x: Tensor, idx: Tensor, create_graph: bool = True) -> Tensor:
        """d inner_loss(student(x)) / d params [P], kept in the graph unless ``create_graph`` is False (then
        ``params`` must be a detached leaf and grad must be enabled). ``x`` [B, C, H, W] goes through in
        ``chunk_size`` slices (a CPU's cache-sized passes; one pass on a GPU), each slice's mean loss weighted
        by its share of B: the same gradient, since the inner loss is a batch mean and the flat student has no
        batch statistics."""
        grad, batch = None, x.shape[0]
        size = self.chunk_size(batch)
        for part_x, part_idx in zip(x.split(size), idx.split(size)):
            with self.autocast():
                logits = self.flat(params, part_x)
            loss = self.inner_loss(logits.float(), part_idx) * (part_x.shape[0] / batch)
            part_grad = torch.autograd.grad(loss, params, create_graph=create_graph)[0]
            grad = part_grad if grad is None else grad + part_grad
        return grad

    def batches(self, g: torch.Generator) -> list[Tensor]:
        """Index chunks for the ``syn_steps`` steps: consecutive chunks of random permutations of the set
        (a new permutation when one is used up), ``batch_syn`` images each (0 = all), as the official code."""
        n = self.images.shape[0]
        size = self.cfg.batch_syn or n
        chunks: list[Tensor] = []
        while len(chunks) < self.cfg.syn_steps:
            chunks.extend(torch.randperm(n, generator=g).split(size))
        return [c.to(self.device) for c in chunks[:self.cfg.syn_steps]]

    # ------------------------------------------------------------------ set-up helpers
    def _check_window(self) -> None:
        cfg, epochs = self.cfg, self.experts.epochs
        if not 0 <= cfg.min_start_epoch < cfg.max_start_epoch:
            raise ValueError(f"need 0 <= min_start_epoch < max_start_epoch, got {cfg.min_start_epoch} and "
                             f"{cfg.max_start_epoch}")
        if cfg.max_start_epoch - 1 + cfg.expert_epochs > epochs:
            raise ValueError(f"max_start_epoch {cfg.max_start_epoch} - 1 + expert_epochs {cfg.expert_epochs} "
                             f"exceeds the {epochs} epochs of the experts in {cfg.experts}; lower them or train "
                             f"longer experts")
        if self.flat.num_params != self.experts.num_params:
            raise ValueError(f"{cfg.model} has {self.flat.num_params} parameters but the experts in {cfg.experts} "
                             f"have {self.experts.num_params}")

    @torch.no_grad()
    def correctly_classified(self, g: torch.Generator) -> Tensor:
        """DATM's 'samples_predicted_correctly' init [K * ipc, C, H, W]: per class, real images in a random
        order that expert 0's final parameters classify correctly (misclassified ones fill any shortfall)."""
        params, picks = self.experts.final(0).to(self.device), []
        for c in range(self.num_classes):
            x = self.real.sample(c, int(self.real.class_counts[c]), g)
            pred = torch.cat([self.flat(params, part).argmax(dim=1) for part in x.split(256)])
            order = torch.cat([(pred == c).nonzero().squeeze(1), (pred != c).nonzero().squeeze(1)])
            picks.append(x[order[:self.cfg.ipc]])
        return torch.cat(picks).float()

    def synthetic_set(self) -> SyntheticSet:
        synset = super().synthetic_set()
        synset.lr = self.lr.detach().cpu().clone()
        synset.meta["experts"] = {"dir": str(self.cfg.experts), "count": len(self.experts),
                                  "settings": self.experts.settings}
        synset.meta["learned_lr"] = {"value": float(synset.lr), "parameterisation": "lr_floor * softplus(raw / "
                                     f"lr_floor), lr_floor = {self.cfg.lr_floor}"}
        synset.meta["protocol"] = asdict(get_protocol("dc", name=f"dc-{self.name}", batch_size=self.eval_batch))
        return synset

    eval_batch = 256  # the evaluation batch of the official code (MTT 256, DATM/PAD configs 128)


class RecomputedStep(torch.autograd.Function):
    """One checkpointed student step (``recompute_steps``): ``params - lr * d inner_loss / d params`` [P].

    ``apply(distiller, g, idx, params [P], lr [], *leaves)``; ``leaves`` are the learned tensors the step reads
    through the distiller (images [N, C, H, W]; DATM: soft labels [N, K]) and get their gradient here. The forward
    takes the gradient without ``create_graph`` and saves only ``params``, ``idx`` [B] and ``g``'s state before
    the step's DSA draw (draws then advance ``g`` as in the plain unroll); the backward replays the draw in a
    fresh generator, rebuilds the step with ``create_graph=True`` and returns its vector-Jacobian products.
    Memory: N x P floats plus one step's graph instead of N steps' graphs; time: one more forward and
    backward pass of the student per step (~1.3x).
    """

    @staticmethod
    def forward(ctx, distiller: MTT, g: torch.Generator, idx: Tensor, params: Tensor, lr: Tensor,
                *leaves: Tensor) -> Tensor:
        ctx.distiller, ctx.rng_state, ctx.rng_device = distiller, g.get_state(), g.device
        ctx.save_for_backward(idx, params, lr, *leaves)
        x = distiller.step_batch(idx, g)  # grad is off in a Function's forward: no graph to the images
        with torch.enable_grad():
            p = params.detach().requires_grad_(True)
            grad = distiller.student_gradient(p, x, idx, create_graph=False)
        return params - lr * grad

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        d = ctx.distiller
        idx, params, lr, *leaves = ctx.saved_tensors
        g = torch.Generator(device=ctx.rng_device)
        g.set_state(ctx.rng_state)
        with torch.enable_grad():
            p, lr = params.detach().requires_grad_(True), lr.detach().requires_grad_(True)
            out = p - lr * d.student_gradient(p, d.step_batch(idx, g), idx)
        needs = ctx.needs_input_grad[3:]
        wanted = [t for t, need in zip((p, lr, *leaves), needs) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
        return None, None, None, *(next(grads) if need else None for need in needs)


def _load_checked(cfg: MTTConfig, real: RealSet) -> Experts:
    """The experts of ``cfg.experts``, checked against the dataset and the model."""
    if not cfg.experts:
        raise ValueError("trajectory matching needs expert trajectories: pass --experts DIR (train them with "
                         "`python -m ddlib experts --out DIR ...`)")
    experts = load_experts(cfg.experts, limit=cfg.max_experts or None)
    made_for, here = experts.settings["dataset"], real.meta()
    for key in ("name", "channels", "image_size", "num_classes", "zca"):
        if made_for.get(key) != here[key]:
            raise ValueError(f"the experts in {cfg.experts} were trained on {made_for.get('name')} with "
                             f"{key}={made_for.get(key)}, but this run uses {here['name']} with {key}={here[key]}")
    if experts.config["model"].lower() != cfg.model.lower():
        raise ValueError(f"the experts in {cfg.experts} are {experts.config['model']} networks; pass "
                         f"--model {experts.config['model']}")
    return experts
