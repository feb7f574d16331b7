"""The evaluation protocol: train a fresh network on a (synthetic or real) set, test it on real data.

One training loop serves every use: a distilled set, a coreset, a random real subset and the full
training set (the upper bound) are all evaluated by ``evaluate``, so their numbers are comparable.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddlib.augment import DSA, dc_augment, default_strategy
from ddlib.data import RealSet
from ddlib.metrics import PeakMemory, classification_metrics, count_flops, mean_std
from ddlib.models import get_network, has_batchnorm
from ddlib.rng import generator
from ddlib.synset import SyntheticSet
from ddlib.utils import autocast_context, pass_size, progress

__all__ = ["Protocol", "PROTOCOLS", "get_protocol", "EvalResult", "train_network", "test_network",
           "evaluate", "evaluate_synset", "evaluate_full", "reusable_full_data", "evaluate_snapshots",
           "DatasetMismatchError"]


@dataclass(frozen=True)
class Protocol:
    """How a fresh network is trained and tested."""

    name: str = "dc"
    epochs: int = 1000            # passes over the training set (the papers use 1000; 300 without augmentation)
    lr: float = 0.01              # SGD learning rate (a learned rate stored with the set replaces it)
    momentum: float = 0.9         # SGD momentum
    weight_decay: float = 5e-4    # SGD weight decay
    batch_size: int = 256         # training mini-batch
    schedule: str = "step"        # "step": lr x0.1 after epoch epochs//2+1 with a fresh optimiser (official
                                  # code; momentum is reset); "cosine": annealed per epoch to 0; "constant"
    augment: str = "dsa"          # "dsa" (non-siamese DSA per batch), "dc" (DC's crop/scale/rotate), "none"
    extra_epoch: bool = True      # the official loop runs epochs + 1 passes; False runs exactly `epochs`
    test_batch_size: int = 1024   # batch for testing (no augmentation)
    use_learned_lr: bool = True   # train with the set's learned lr when it carries one (MTT, DATM, PAD)

    def describe(self) -> str:
        return (f"{self.name}: SGD lr {self.lr} momentum {self.momentum} wd {self.weight_decay}, "
                f"{self.epochs} epochs ({self.schedule}), batch {self.batch_size}, augment {self.augment}")


PROTOCOLS: dict[str, Protocol] = {
    # DC/DSA/DM/DataDAM papers: 1000 epochs with DSA, lr /10 at half.
    "dc": Protocol(name="dc"),
    # DC's evaluation with its own augmentation (MNIST: crop_scale_rotate), as the DC paper's tables.
    "dc-aug": Protocol(name="dc-aug", augment="dc"),
    # The course's Task 1 2(a)/(e): SGD lr 0.01 with cosine annealing, 20 epochs, other details as DC.
    "course": Protocol(name="course", epochs=20, schedule="cosine", augment="none", extra_epoch=False),
}


def get_protocol(protocol: str | Protocol = "dc", **overrides: Any) -> Protocol:
    """A named protocol with any field overridden (``None`` values are ignored)."""
    if isinstance(protocol, str):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}")
        protocol = PROTOCOLS[protocol]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(protocol, **overrides) if overrides else protocol


class DatasetMismatchError(ValueError):
    """A set made for one dataset (channels, size, classes, normalisation) evaluated on another."""


@dataclass
class EvalResult:
    """Test metrics of ``num_eval`` freshly initialised networks trained the same way."""

    model: str
    protocol: dict
    accuracies: list[float]                  # test accuracy of each network, fractions in [0, 1]
    balanced_accuracies: list[float]
    aucs: list[float] = field(default_factory=list)   # binary tasks only (e.g. MHIST)
    train_seconds: list[float] = field(default_factory=list)
    num_train_images: int = 0
    flops_per_image: int = 0                 # forward FLOPs of one test image (FLOP = 2 x MAC)
    train_flops: int = 0                     # FLOPs of one network's whole training run (fwd + bwd)
    peak_memory_bytes: int = 0

    @property
    def accuracy_mean(self) -> float:
        return mean_std(self.accuracies)[0]

    @property
    def accuracy_std(self) -> float:
        return mean_std(self.accuracies)[1]

    def summary(self) -> dict[str, Any]:
        """Plain values for metrics.json: means, stds (population std, as the papers' np.std) and costs."""
        out = {
            "model": self.model,
            "num_eval": len(self.accuracies),
            "accuracy_mean": self.accuracy_mean,
            "accuracy_std": self.accuracy_std,
            "accuracies": self.accuracies,
            "balanced_accuracy_mean": mean_std(self.balanced_accuracies)[0],
            "balanced_accuracy_std": mean_std(self.balanced_accuracies)[1],
            "train_seconds_mean": mean_std(self.train_seconds)[0] if self.train_seconds else 0.0,
            "num_train_images": self.num_train_images,
            "flops_per_image": self.flops_per_image,
            "train_flops": self.train_flops,
            "peak_memory_bytes": self.peak_memory_bytes,
            "protocol": self.protocol,
        }
        if self.aucs:
            out["auc_mean"], out["auc_std"] = mean_std(self.aucs)
        return out

    def __str__(self) -> str:
        return (f"{100 * self.accuracy_mean:.2f} ± {100 * self.accuracy_std:.2f} % "
                f"({self.model}, n={len(self.accuracies)})")


# ---------------------------------------------------------------------------------------- training
def _loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy with hard labels [B] or soft labels [B, K] (logits; softmax taken here, as DATM)."""
    if targets.dim() == 2:
        return -(targets.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1).mean()
    return F.cross_entropy(logits, targets)


def _augmenter(protocol: Protocol, dsa_strategy: str):
    if protocol.augment == "dsa":
        dsa = DSA(dsa_strategy)
        return lambda x, g: dsa(x, g)
    if protocol.augment == "dc":
        return lambda x, g: dc_augment(x, g)
    if protocol.augment == "none":
        return lambda x, g: x
    raise ValueError(f"unknown augmentation {protocol.augment!r}; use dsa, dc or none")


def train_network(net: nn.Module, images: Tensor, labels: Tensor, protocol: Protocol, *,
                  rng: torch.Generator, lr: float | None = None,
                  dsa_strategy: str = "color_crop_cutout_flip_scale_rotate",
                  show_progress: bool = False, precision: str = "fp32") -> nn.Module:
    """Train ``net`` in place on ``images`` [N, C, H, W] with ``labels`` [N] (or soft [N, K]).

    Shuffling and augmentation draw from ``rng`` (a CPU generator). ``lr`` overrides the protocol's.
    ``precision`` autocasts the forward passes (the weights and their updates stay fp32); fp16 scales the
    loss so that small gradients do not underflow.
    """
    base_lr = protocol.lr if lr is None else float(lr)
    augment = _augmenter(protocol, dsa_strategy)
    make_opt = lambda rate: torch.optim.SGD(net.parameters(), lr=rate, momentum=protocol.momentum,  # noqa: E731
                                            weight_decay=protocol.weight_decay)
    optimizer = make_opt(base_lr)
    epochs = protocol.epochs + (1 if protocol.extra_epoch else 0)
    n, device = images.shape[0], images.device
    # Gradient accumulation over cache-sized slices on a CPU: the same gradient (up to float rounding),
    # ~1.5x faster for ConvNets. BatchNorm nets train on whole batches (their statistics depend on them).
    split = protocol.batch_size if has_batchnorm(net) else pass_size(device, protocol.batch_size)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    net.train()
    for epoch in progress(range(epochs), desc="train", enable=show_progress):
        if protocol.schedule == "cosine":
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * base_lr * (1 + math.cos(math.pi * epoch / protocol.epochs))
        order = torch.randperm(n, generator=rng).to(device)
        for start in range(0, n, protocol.batch_size):
            idx = order[start:start + protocol.batch_size]
            x, y = augment(images[idx], rng), labels[idx]
            optimizer.zero_grad(set_to_none=True)
            for part_x, part_y in zip(x.split(split), y.split(split)):
                with autocast_context(device, precision):
                    loss = _loss(net(part_x), part_y) * (part_x.shape[0] / x.shape[0])
                scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if protocol.schedule == "step" and epoch == protocol.epochs // 2 + 1:
            optimizer = make_opt(base_lr * 0.1)  # a fresh optimiser, as the official code (momentum reset)
    return net


@torch.no_grad()
def test_network(net: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1024) -> dict[str, float]:
    """Accuracy, balanced accuracy (and ROC AUC for two classes) of ``net`` on a test set.

    On a CPU the batches go through in cache-sized slices (eval mode: the result does not depend on it):
    1,024-image batches of a ConvNet allocate ~0.4 GB maps that the kernel must zero on every pass, which
    measured half the time of a test pass in system calls (ConvNet-3, 4,096 MNIST-sized images, one thread on a
    loaded 2-core machine: 36.6 s -> 16.9 s; system time 10.5 s -> 0.3 s).
    """
    net.eval()
    step = pass_size(images.device, batch_size)
    logits = torch.cat([net(images[i:i + step]) for i in range(0, images.shape[0], step)])
    return classification_metrics(logits.float().cpu(), labels.cpu())


# ---------------------------------------------------------------------------------------- evaluation
def evaluate(images: Tensor, labels: Tensor, real: RealSet, *, model: str = "convnet",
             protocol: str | Protocol = "dc", num_eval: int = 5, seed: int = 0, lr: float | None = None,
             device: str | torch.device = "cpu", show_progress: bool = False,
             model_overrides: dict | None = None) -> EvalResult:
    """Train ``num_eval`` fresh ``model`` networks on (images, labels) and test each on ``real.test``.

    Network i is initialised from ``generator(seed, "eval-net", i)`` and trained with
    ``generator(seed, "eval-train", i)``, so results are reproducible and independent of the order runs.
    """
    protocol = get_protocol(protocol)
    device = torch.device(device)
    images, labels = images.to(device), labels.to(device)
    test_x, test_y = real.test_images.to(device), real.test_labels.to(device)
    strategy = default_strategy(real.name)
    result = EvalResult(model=model, protocol=asdict(protocol), accuracies=[], balanced_accuracies=[],
                        num_train_images=int(images.shape[0]))
    with PeakMemory(device) as memory:
        for i in range(num_eval):
            net = get_network(model, real.channels, real.num_classes, real.image_size,
                              generator=generator(seed, "eval-net", i), device=device, **(model_overrides or {}))
            start = time.perf_counter()
            train_network(net, images, labels, protocol, rng=generator(seed, "eval-train", i), lr=lr,
                          dsa_strategy=strategy, show_progress=show_progress)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            result.train_seconds.append(time.perf_counter() - start)
            metrics = test_network(net, test_x, test_y, protocol.test_batch_size)
            result.accuracies.append(metrics["accuracy"])
            result.balanced_accuracies.append(metrics["balanced_accuracy"])
            if "auc" in metrics:
                result.aucs.append(metrics["auc"])
    result.peak_memory_bytes = memory.peak_bytes
    shape = (real.channels, real.image_size, real.image_size)
    result.flops_per_image = count_flops(net, shape)
    per_step = count_flops(net, shape, backward=True)
    epochs = protocol.epochs + (1 if protocol.extra_epoch else 0)
    result.train_flops = per_step * int(images.shape[0]) * epochs
    return result


def check_compatible(synset: SyntheticSet, real: RealSet) -> None:
    """Raise DatasetMismatchError if ``synset`` was not made for ``real``'s format."""
    made_for = synset.meta.get("dataset")
    if not made_for:
        return
    here = real.meta()
    for key in ("channels", "image_size", "num_classes"):
        if int(made_for[key]) != int(here[key]):
            raise DatasetMismatchError(
                f"the synthetic set was made for {made_for.get('name')} with {key}={made_for[key]}, but the "
                f"evaluation dataset {here['name']} has {key}={here[key]}; load the dataset with the same "
                f"settings (e.g. --image-size {made_for['image_size']})")
    for key in ("mean", "std"):
        if not torch.allclose(torch.tensor(made_for[key], dtype=torch.float64),
                              torch.tensor(here[key], dtype=torch.float64), atol=1e-4):
            raise DatasetMismatchError(
                f"the synthetic set was normalised with {key}={made_for[key]} but {here['name']} uses "
                f"{here[key]}: evaluate it on the dataset (and size) it was distilled from")
    if bool(made_for.get("zca")) != bool(here.get("zca")):
        raise DatasetMismatchError("the synthetic set and the dataset disagree on ZCA whitening; "
                                   f"load the dataset with zca={bool(made_for.get('zca'))}")


def evaluate_synset(synset: SyntheticSet, real: RealSet, *, model: str | None = None,
                    protocol: str | Protocol | None = None, num_eval: int = 5, seed: int = 0,
                    device: str | torch.device = "cpu", show_progress: bool = False,
                    **protocol_overrides) -> EvalResult:
    """Evaluate a synthetic set: its model and protocol default to the ones stored in the set."""
    check_compatible(synset, real)
    model = model or synset.meta.get("config", {}).get("model", "convnet")
    stored = synset.meta.get("protocol")
    if protocol is None:
        protocol = Protocol(**stored) if isinstance(stored, dict) else "dc"
    protocol = get_protocol(protocol, **protocol_overrides)
    lr = synset.lr.item() if (synset.lr is not None and synset.lr.numel() == 1 and protocol.use_learned_lr) else None
    return evaluate(synset.images, synset.labels, real, model=model, protocol=protocol, num_eval=num_eval,
                    seed=seed, lr=lr, device=device, show_progress=show_progress)


def evaluate_full(real: RealSet, *, model: str = "convnet", protocol: str | Protocol = "course",
                  num_eval: int = 1, seed: int = 0, device: str | torch.device = "cpu",
                  show_progress: bool = True, **protocol_overrides) -> EvalResult:
    """The upper bound: ``model`` trained on the whole training set under ``protocol``."""
    protocol = get_protocol(protocol, **protocol_overrides)
    return evaluate(real.train_images, real.train_labels, real, model=model, protocol=protocol,
                    num_eval=num_eval, seed=seed, device=device, show_progress=show_progress)


def reusable_full_data(summary: dict[str, Any], *, model: str, num_train_images: int, protocol: str,
                       min_epochs: int) -> tuple[bool, str]:
    """Whether a stored ``evaluate_full(...).summary()`` can stand for a new full-data run, and the reason.

    It must be the same model, training-set size and protocol name, trained at least ``min_epochs`` epochs
    (a shorter run would lower the full-data line). A summary without these fields (hand-written, or from an
    older tool) is not reused rather than trusted.
    """
    stored_protocol = summary.get("protocol") if isinstance(summary.get("protocol"), dict) else {}
    stored = {"model": summary.get("model"), "training images": summary.get("num_train_images"),
              "protocol": stored_protocol.get("name")}
    wanted = {"model": model, "training images": num_train_images, "protocol": protocol}
    for key, value in wanted.items():
        if stored[key] != value:
            return False, f"its {key} is {stored[key]!r}, not {value!r}"
    epochs = stored_protocol.get("epochs")
    if not isinstance(epochs, int) or epochs < min_epochs:
        return False, f"it trained {epochs!r} epochs, fewer than the {min_epochs} asked for"
    return True, f"{protocol} protocol, {epochs} epochs"


def evaluate_snapshots(synset: SyntheticSet, real: RealSet, *, every: int = 1, model: str | None = None,
                       protocol: str | Protocol | None = None, num_eval: int = 1, seed: int = 0,
                       device: str | torch.device = "cpu", **protocol_overrides) -> list[dict[str, Any]]:
    """Accuracy against iteration: every saved snapshot of ``synset`` (``meta["snapshots"]``) whose
    iteration is a multiple of ``every``, and always the last one, evaluated like ``evaluate_synset``.

    Returns one record per snapshot: iteration, accuracy_mean/std (fractions), balanced accuracy, seconds
    into the distillation when the history records it.
    """
    snaps = synset.meta.get("snapshots")
    if not snaps:
        raise ValueError("the synthetic set has no snapshots; distil it with snapshot_every > 0")
    history = synset.meta.get("history", {})
    seconds = dict(zip(history.get("iteration", []), history.get("seconds", [])))
    last = snaps["iterations"][-1]
    records = []
    for iteration, images in zip(snaps["iterations"], snaps["images"]):
        if iteration % max(every, 1) and iteration != last:
            continue
        snap = SyntheticSet(images.float(), synset.labels, synset.lr, synset.meta)
        s = evaluate_synset(snap, real, model=model, protocol=protocol, num_eval=num_eval, seed=seed,
                            device=device, **protocol_overrides).summary()
        records.append({"iteration": iteration, "seconds": seconds.get(iteration, 0.0 if iteration == 0 else None),
                        **{k: s[k] for k in ("accuracy_mean", "accuracy_std", "balanced_accuracy_mean")}})
    return records
