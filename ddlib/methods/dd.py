"""DD: the original bilevel Dataset Distillation (Wang et al., 2018; algorithms.md section 1).

The synthetic set is ``ipc`` blocks of K images (block t holds image t of every class) plus one learned
learning rate per gradient step. A network starts from a fixed initialisation (``fixed_init``, the
paper's "known init") or a fresh Xavier initialisation per iteration, takes ``epochs x ipc`` plain
gradient steps ``w <- w - lr_t * grad CE(f(X_{t mod ipc}; w), labels)``, and the cross-entropy of the
result on a real batch is minimised w.r.t. the images and the rates (Adam, as the original).

The unroll is differentiated end to end with ``torch.func.grad`` inside ordinary autograd: memory grows
linearly with the steps (about steps x the activations of one K-image block plus the parameters; a few
MB for LeNet on MNIST). The rates are ``softplus(raw)``, so they stay positive.

Evaluation is replay: ``replay`` trains networks with the learned steps and rates (the fixed init, or
fresh inits) and tests them; the images can also go through the standard protocol (``ddlib.evaluate``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad

from ddlib.data import RealSet
from ddlib.evaluate import EvalResult, check_compatible, test_network
from ddlib.methods.base import DistillConfig, Distiller
from ddlib.methods.registry import register_method
from ddlib.models import get_network
from ddlib.rng import generator
from ddlib.synset import SyntheticSet

__all__ = ["DDConfig", "DD", "xavier_init", "step_blocks", "unroll", "replay"]


@dataclass
class DDConfig(DistillConfig):
    """DD's settings; defaults are the original code's (base_options.py) for MNIST with LeNet."""

    ipc: int = 10                    # distill_steps: one block of K images per step (1 image/class/step)
    iterations: int = 2000           # outer Adam steps (the original: 400 epochs of 59 batches ~ 23,600)
    model: str = "lenet"             # the original's MNIST network
    lr_img: float = 0.01             # Adam lr of the images and the raw rates (betas 0.5, 0.999)
    batch_real: int = 100            # real images per class per iteration (the original: 1024 at random)
    init: str = "noise"              # N(0, 1) in normalised space, as the original
    dsa: bool = False                # the original has no augmentation
    epochs: int = 3                  # distill_epochs: passes over the ipc blocks (steps = epochs x ipc)
    lr_init: float = 0.02            # distill_lr: every step's rate at the start
    fixed_init: bool = True          # one fixed network init ("known init"); False: a fresh init per iteration
    init_gain: float = 1.0           # Xavier-normal gain of the network init (biases 0)
    decay_every: int = 2360          # Adam lr x decay_factor every this many iterations (40 original epochs)
    decay_factor: float = 0.5


def xavier_init(net: nn.Module, gain: float, rng: torch.Generator) -> dict[str, Tensor]:
    """Parameters for ``net``: Xavier-normal weights of every conv/linear layer (std = gain *
    sqrt(2 / (fan_in + fan_out))), zero biases, norm layers at their defaults; drawn from ``rng``."""
    out = {}
    for name, p in net.named_parameters():
        if name.endswith("weight") and p.dim() >= 2:
            receptive = math.prod(p.shape[2:])
            fan_in, fan_out = p.shape[1] * receptive, p.shape[0] * receptive
            std = gain * math.sqrt(2.0 / (fan_in + fan_out))
            out[name] = (torch.randn(p.shape, generator=rng) * std).to(p)
        elif name.endswith("bias"):
            out[name] = torch.zeros_like(p)
        else:
            out[name] = torch.ones_like(p)  # norm weights
    return out


def step_blocks(images: Tensor, num_classes: int) -> Tensor:
    """[K * ipc, C, H, W] ordered by class -> [ipc, K, C, H, W] (block t = image t of every class)."""
    return images.view(num_classes, -1, *images.shape[1:]).transpose(0, 1)


def unroll(net: nn.Module, params: dict[str, Tensor], blocks: Tensor, lrs: Tensor) -> dict[str, Tensor]:
    """``len(lrs)`` gradient steps from ``params`` on blocks [S, K, C, H, W] (step t uses block t mod S,
    labels 0..K-1); differentiable w.r.t. the blocks, the rates and the starting parameters."""
    labels = torch.arange(blocks.shape[1], device=blocks.device)

    def loss(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(net, p, (x,)), labels)

    for t in range(lrs.shape[0]):
        g = grad(loss)(params, blocks[t % blocks.shape[0]])
        params = {k: params[k] - lrs[t] * g[k] for k in params}
    return params


@register_method("dd")
class DD(Distiller):
    name = "dd"
    Config = DDConfig
    state_attrs = (*Distiller.state_attrs, "raw_lrs", "scheduler")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg, real = self.cfg, self.real
        self.net = get_network(cfg.model, real.channels, real.num_classes, real.image_size, device=self.device)
        self.net.requires_grad_(False)
        self.net.eval()
        steps = cfg.epochs * cfg.ipc
        raw = math.log(math.expm1(cfg.lr_init))  # softplus^-1
        self.raw_lrs = torch.full((steps,), raw, device=self.device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.images, self.raw_lrs], lr=cfg.lr_img, betas=(0.5, 0.999))
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, cfg.decay_every, cfg.decay_factor)
        self.init_key = ("fixed-init",)
        self.fixed_params = xavier_init(self.net, cfg.init_gain, self.rng(*self.init_key))

    @property
    def lrs(self) -> Tensor:
        """The learned rate of every step [epochs * ipc], positive."""
        return F.softplus(self.raw_lrs)

    def step(self, iteration: int) -> dict[str, Tensor]:
        cfg = self.cfg
        params = (self.fixed_params if cfg.fixed_init
                  else xavier_init(self.net, cfg.init_gain, self.rng("net", iteration)))
        real_x = self.real.sample_per_class(cfg.batch_real, self.rng("real", iteration))
        real_y = torch.arange(self.num_classes, device=self.device).repeat_interleave(real_x.shape[1])
        with self.autocast():
            final = unroll(self.net, params, step_blocks(self.images, self.num_classes), self.lrs)
            loss = F.cross_entropy(functional_call(self.net, final, (real_x.flatten(0, 1),)), real_y)
        self.update_images(loss)
        self.scheduler.step()
        return {"loss": loss.detach(), "mean_lr": self.lrs.detach().mean()}

    def synthetic_set(self) -> SyntheticSet:
        synset = super().synthetic_set()
        synset.meta["dd"] = {"lrs": self.lrs.detach().cpu().tolist(), "steps": self.cfg.ipc,
                             "epochs": self.cfg.epochs, "fixed_init": self.cfg.fixed_init,
                             "init_gain": self.cfg.init_gain, "init_key": list(self.init_key)}
        return synset


def replay(synset: SyntheticSet, real: RealSet, *, fixed_init: bool | None = None, num_eval: int = 1,
           seed: int = 0, device: str | torch.device = "cpu") -> EvalResult:
    """Train networks with a DD set's own steps and rates, then test them on ``real.test``.

    fixed_init (default: as distilled) replays from the exact initialisation the set was learned for
    (the paper's 94 % setting, one network); otherwise each of ``num_eval`` networks starts from a fresh
    Xavier init drawn from ``generator(seed, "dd-replay", i)``.
    """
    meta = synset.meta.get("dd")
    if meta is None:
        raise ValueError("this synthetic set was not made by DD (no meta['dd']); evaluate it with ddlib.evaluate")
    check_compatible(synset, real)
    cfg = synset.meta["config"]
    fixed = meta["fixed_init"] if fixed_init is None else fixed_init
    device = torch.device(device)
    net = get_network(cfg["model"], real.channels, real.num_classes, real.image_size, device=device)
    net.requires_grad_(False)
    lrs = torch.tensor(meta["lrs"], device=device)
    blocks = step_blocks(synset.images.to(device), real.num_classes)
    result = EvalResult(model=cfg["model"], protocol={"name": "dd-replay", "fixed_init": fixed,
                                                      "steps": len(meta["lrs"])},
                        accuracies=[], balanced_accuracies=[], num_train_images=int(synset.images.shape[0]))
    for i in range(1 if fixed else num_eval):
        rng = (generator(synset.meta["seed"], "dd", *meta["init_key"]) if fixed
               else generator(seed, "dd-replay", i))
        start = time.perf_counter()
        params = unroll(net, xavier_init(net, meta["init_gain"], rng), blocks, lrs)
        result.train_seconds.append(time.perf_counter() - start)
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(params[name])
        metrics = test_network(net, real.test_images.to(device), real.test_labels.to(device))
        result.accuracies.append(metrics["accuracy"])
        result.balanced_accuracies.append(metrics["balanced_accuracy"])
        if "auc" in metrics:
            result.aucs.append(metrics["auc"])
    return result
