"""Class-incremental continual learning with a memory of exemplars (the DM/DataDAM papers' protocol).

The classes arrive in ``num_steps`` groups (MNIST: 5 steps of 2 classes). After step s the memory holds the
images of every class seen so far, taken from a per-class set: a distilled ``SyntheticSet`` or a coreset of
real exemplars (``select_random``, ``select_herding``). A fresh network is trained **from scratch** on the
whole memory after each step and tested on the test images of the classes seen so far. The classifier always
has all K outputs (as the papers), so a test image predicted as a class not yet seen counts as an error.

    memory = distill("datadam", real, ipc=10)            # or select_herding(real, 10)
    result = continual_learning(memory, real, num_steps=5)
    result.accuracies                                    # [5] fractions in [0, 1], one per step
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import pandas as pd
import torch
from torch import Tensor

from ddlib.augment import default_strategy
from ddlib.data import RealSet
from ddlib.evaluate import Protocol, check_compatible, get_protocol, test_network, train_network
from ddlib.metrics import mean_std
from ddlib.models import get_network
from ddlib.rng import generator
from ddlib.synset import SyntheticSet

__all__ = ["ContinualResult", "class_order", "class_steps", "compare_memories", "continual_learning"]


@dataclass
class ContinualResult:
    """Test accuracy after every step of one class-incremental run."""

    new_classes: list[list[int]]              # classes added at each step
    runs: list[list[float]]                   # [step][network] accuracy on the classes seen so far, in [0, 1]
    memory_sizes: list[int] = field(default_factory=list)   # memory images trained on at each step
    test_sizes: list[int] = field(default_factory=list)     # test images of the classes seen so far
    seconds: list[float] = field(default_factory=list)      # training seconds per step, summed over networks
    model: str = "convnet"
    protocol: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.new_classes)

    @property
    def classes_seen(self) -> list[list[int]]:
        """[step] -> every class seen up to and including that step."""
        return [sorted(c for step in self.new_classes[:s + 1] for c in step) for s in range(self.num_steps)]

    @property
    def accuracies(self) -> list[float]:
        """[step] mean accuracy over the networks (fractions in [0, 1])."""
        return [mean_std(r)[0] for r in self.runs]

    @property
    def stds(self) -> list[float]:
        """[step] population std over the networks (0 for one network)."""
        return [mean_std(r)[1] for r in self.runs]

    def to_frame(self) -> pd.DataFrame:
        """One row per step: step (1-based), classes seen, new classes, memory/test sizes, accuracy mean/std."""
        return pd.DataFrame({
            "step": range(1, self.num_steps + 1),
            "classes_seen": [len(c) for c in self.classes_seen],
            "new_classes": [" ".join(map(str, c)) for c in self.new_classes],
            "memory_images": self.memory_sizes,
            "test_images": self.test_sizes,
            "accuracy_mean": self.accuracies,
            "accuracy_std": self.stds,
            "train_seconds": self.seconds,
        })


def class_order(num_classes: int, seed: int) -> list[int]:
    """A seeded permutation of ``range(num_classes)`` for ``order=`` (the papers use 0..K-1 in order)."""
    return torch.randperm(num_classes, generator=generator(seed, "continual-order")).tolist()


def class_steps(num_classes: int, num_steps: int, order: list[int] | None = None) -> list[list[int]]:
    """Split the classes (``order``, default 0..K-1) into ``num_steps`` contiguous groups.

    ``class_steps(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]``. When K is not a multiple of the
    steps the first K % steps groups get one class more (as ``numpy.array_split``).
    """
    order = list(range(num_classes)) if order is None else [int(c) for c in order]
    if sorted(order) != list(range(num_classes)):
        raise ValueError(f"order must be a permutation of 0..{num_classes - 1}, got {order}")
    if not 1 <= num_steps <= num_classes:
        raise ValueError(f"num_steps must lie in [1, {num_classes}], got {num_steps}")
    size, extra = divmod(num_classes, num_steps)
    bounds = [s * size + min(s, extra) for s in range(num_steps + 1)]
    return [order[bounds[s]:bounds[s + 1]] for s in range(num_steps)]


def _member(labels: Tensor, classes: list[int]) -> Tensor:
    """[N] bool: which of ``labels`` [N] (hard) lie in ``classes``."""
    return torch.isin(labels, torch.tensor(classes, dtype=labels.dtype, device=labels.device))


def _memory_rows(memory: SyntheticSet, classes: list[int], images_per_class: int | None) -> Tensor:
    """Rows [M] of ``memory`` whose class is in ``classes``, at most ``images_per_class`` per class (the
    first ones in the set's order, so a coreset keeps its best-ranked exemplars)."""
    labels = memory.hard_labels.cpu()
    rows = []
    for c in classes:
        of_class = torch.nonzero(labels == c).flatten()
        if len(of_class) == 0:
            raise ValueError(f"the memory holds no image of class {c}; every class needs exemplars")
        rows.append(of_class if images_per_class is None else of_class[:images_per_class])
    return torch.cat(rows)


def continual_learning(memory: SyntheticSet, real: RealSet, *, num_steps: int = 5, model: str = "convnet",
                       protocol: str | Protocol = "dc", num_eval: int = 1, seed: int = 0,
                       device: str | torch.device = "cpu", order: list[int] | None = None,
                       images_per_class: int | None = None, model_overrides: dict | None = None,
                       **protocol_overrides) -> ContinualResult:
    """Class-incremental learning: after each step train ``num_eval`` fresh networks on the memory of the
    classes seen so far and test them on ``real``'s test images of those classes.

    ``memory`` holds images [N, C, H, W] with hard [N] or soft [N, K] labels (soft labels are used as they
    are; class membership is their argmax). ``images_per_class`` caps the exemplars per class (default: all
    of them). Network i of step s is initialised, then trained, from ``generator(seed, "continual", s, i)``,
    so two memories compared with the same seed start from identical networks. A learned lr stored in the
    set is used when the protocol allows it (as ``evaluate_synset``). Nothing here chooses anything, so the
    test set is only reported on.
    """
    check_compatible(memory, real)
    protocol = get_protocol(protocol, **protocol_overrides)
    device = torch.device(device)
    lr = memory.lr.item() if (memory.lr is not None and memory.lr.numel() == 1 and protocol.use_learned_lr) else None
    steps = class_steps(real.num_classes, num_steps, order)
    result = ContinualResult(new_classes=steps, runs=[], model=model, protocol=asdict(protocol))
    for s in range(num_steps):
        seen = sorted(c for step in steps[:s + 1] for c in step)
        rows = _memory_rows(memory, seen, images_per_class).to(memory.images.device)
        x, y = memory.images[rows].to(device), memory.labels[rows].to(device)
        in_test = _member(real.test_labels, seen)
        test_x, test_y = real.test_images[in_test].to(device), real.test_labels[in_test].to(device)
        accuracies, seconds = [], 0.0
        for i in range(num_eval):
            g = generator(seed, "continual", s, i)
            net = get_network(model, real.channels, real.num_classes, real.image_size, generator=g,
                              device=device, **(model_overrides or {}))
            start = time.perf_counter()
            train_network(net, x, y, protocol, rng=g, lr=lr, dsa_strategy=default_strategy(real.name))
            seconds += time.perf_counter() - start
            accuracies.append(test_network(net, test_x, test_y, protocol.test_batch_size)["accuracy"])
        result.runs.append(accuracies)
        result.memory_sizes.append(len(rows))
        result.test_sizes.append(len(test_y))
        result.seconds.append(seconds)
    return result


def compare_memories(memories: dict[str, SyntheticSet], real: RealSet, **kwargs) -> pd.DataFrame:
    """Run ``continual_learning(memory, real, **kwargs)`` for every named memory (same seed, so the same
    network initialisations) and stack the per-step tables: one row per memory x step, with columns
    memory, step, classes_seen, new_classes, memory_images, test_images, accuracy_mean, accuracy_std,
    train_seconds."""
    frames = [continual_learning(memory, real, **kwargs).to_frame().assign(memory=name)
              for name, memory in memories.items()]
    table = pd.concat(frames, ignore_index=True)
    return table[["memory"] + [c for c in table.columns if c != "memory"]]
