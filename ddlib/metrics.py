"""Costs (FLOPs, time, peak memory) and classification metrics.

FLOPs follow the convention of the papers and the course: **one FLOP per add and one per multiply, so
FLOP = 2 × MAC** (multiply-accumulate). ``thop.profile`` returns MACs, so its numbers are half of ours:
ConvNet-3 on a 1×28×28 MNIST image is ≈ 48.4 M MACs ≈ 97 MFLOPs. Report FLOPs per image, then multiply
by the number of images and epochs (``training_flops``) rather than profiling a whole dataset at once.

Only matrix products and convolutions are counted (what ``torch.utils.flop_counter`` counts); norms,
activations and pooling add a few percent at most and are left out, as in every paper's numbers.
"""
from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from typing_extensions import Self

__all__ = [
    "PeakMemory",
    "Timer",
    "accuracy",
    "balanced_accuracy",
    "classification_metrics",
    "count_flops",
    "mean_std",
    "peak_rss_bytes",
    "roc_auc",
    "training_flops",
]

# ---------------------------------------------------------------------------------------------- FLOPs
def count_flops(net: nn.Module, input_shape: tuple[int, ...], *, backward: bool = False) -> int:
    """FLOPs (= 2 × MACs) for ONE image of shape ``input_shape`` = (C, H, W) through ``net``.

    ``backward=True`` counts a training step, ≈ 3 × forward: the forward, the gradient w.r.t. the
    activations (≈ 1 forward) and w.r.t. the weights (≈ 1 forward); the gradient w.r.t. the input image
    is not needed and not counted.
    The net's training flags, parameters, ``.grad`` fields and buffers (BatchNorm running statistics)
    are left exactly as they were: the count runs in eval mode and gradients go through
    ``torch.autograd.grad`` instead of ``.backward()``.
    """
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    x = torch.zeros((1, *input_shape), device=device, dtype=dtype)
    modes = {module: module.training for module in net.modules()}
    net.eval()  # eval: BatchNorm must not update its running statistics from a dummy image
    try:
        with FlopCounterMode(display=False) as counter:
            if backward:
                _forward_backward(net, x)
            else:
                with torch.no_grad():
                    net(x)
        return int(counter.get_total_flops())
    finally:
        for module, training in modes.items():
            module.training = training


def _forward_backward(net: nn.Module, x: Tensor) -> None:
    params = [p for p in net.parameters() if p.requires_grad]
    with torch.enable_grad():
        out = net(x)
        if params:
            torch.autograd.grad(out.float().sum(), params, allow_unused=True)


def training_flops(flops_train_step_per_image: int, num_images: int, epochs: int) -> int:
    """Total FLOPs of training: per-image step cost × images × epochs.

    ``flops_train_step_per_image`` is ``count_flops(net, shape, backward=True)`` (≈ 3 × the forward
    FLOPs). E.g. ConvNet-3 on all of MNIST for 20 epochs: ≈ 3 × 97 M × 60 000 × 20 ≈ 3.5e14 FLOPs.
    """
    return int(flops_train_step_per_image) * int(num_images) * int(epochs)


# ---------------------------------------------------------------------------------------------- time and memory
class Timer:
    """Wall-clock seconds of a ``with`` block; on CUDA it synchronises at entry and exit so queued
    kernels are counted. ``.seconds`` is set on exit."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds: float = float("nan")
        self._start = 0.0

    def __enter__(self) -> Self:
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self._start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class PeakMemory:
    """Peak memory of a ``with`` block, in bytes.

    On CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak at entry (tensors only, not
    the caching allocator's reserve); ``source = "cuda_max_allocated"``.
    On CPU: the process's peak resident set size (RSS). Linux lets us reset the peak at entry (by writing
    5 to /proc/self/clear_refs); then ``source = "cpu_peak_rss"`` and the peak is the block's. Where that
    is refused, the peak is the process-lifetime peak and ``source = "cpu_lifetime_peak_rss"``.

    ``peak_bytes`` is the absolute peak (the memory held before the block included); ``growth_bytes``
    is the peak minus what was held at entry (0 when the lifetime peak predates the block).
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes: int = 0
        self.growth_bytes: int = 0
        self.source: str = ""
        self._baseline = 0

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
            self.source = "cuda_max_allocated"
        else:
            self._baseline = _current_rss_bytes()
            self.source = "cpu_peak_rss" if _reset_peak_rss() else "cpu_lifetime_peak_rss"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.peak_bytes = peak_rss_bytes()
        self.growth_bytes = max(0, self.peak_bytes - self._baseline)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes (VmHWM on Linux, else ``ru_maxrss``)."""
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)  # macOS reports bytes, Linux KiB


def _current_rss_bytes() -> int:
    rss = _proc_status_bytes("VmRSS")
    return rss if rss is not None else peak_rss_bytes()


def _proc_status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the file reports kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- classification
def _as_preds(logits_or_preds: Tensor) -> Tensor:
    """[N, K] logits/probabilities → [N] argmax; [N] predictions pass through."""
    t = torch.as_tensor(logits_or_preds)
    return t.argmax(dim=1) if t.dim() == 2 else t.long()


def accuracy(logits_or_preds: Tensor, labels: Tensor) -> float:
    """Fraction in [0, 1] of correct predictions. Accepts [N, K] logits or [N] class predictions."""
    preds = _as_preds(logits_or_preds).cpu()
    labels = torch.as_tensor(labels).cpu().long()
    if preds.numel() == 0:
        return float("nan")
    return float((preds == labels).double().mean().item())


def balanced_accuracy(preds: Tensor, labels: Tensor, num_classes: int | None = None) -> float:
    """Mean per-class recall in [0, 1] over the classes present in ``labels`` (as sklearn does).

    ``preds``: [N] predictions or [N, K] logits; ``labels``: [N]. For MHIST (63 % majority class) this
    is the number that tells a classifier from "always predict the majority".
    """
    preds = _as_preds(preds).cpu()
    labels = torch.as_tensor(labels).cpu().long()
    k = int(num_classes or max(int(labels.max()), int(preds.max())) + 1)
    support = torch.bincount(labels, minlength=k).double()
    correct = torch.bincount(labels[preds == labels], minlength=k).double()
    present = support > 0
    if not bool(present.any()):
        return float("nan")
    return float((correct[present] / support[present]).mean().item())


def roc_auc(scores_pos_class: Tensor, labels: Tensor) -> float:
    """Binary ROC AUC from the Mann–Whitney U statistic, ties counted as ½; NaN if a class is absent.

    ``scores_pos_class``: [N] higher = more likely class 1; ``labels``: [N] in {0, 1}.
    """
    scores = torch.as_tensor(scores_pos_class).detach().cpu().double().flatten()
    positive = torch.as_tensor(labels).cpu().flatten() == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float((u / (n_pos * n_neg)).item())


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks [N] with tied values sharing the mean of their ranks."""
    _, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    last_rank = torch.cumsum(counts, 0).double()
    mean_rank = last_rank - (counts.double() - 1) / 2
    return mean_rank[inverse]


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """``accuracy`` and ``balanced_accuracy`` (fractions in [0, 1]) from [N, K] logits and [N] labels;
    for K = 2 also ``auc`` from the softmax probability of class 1."""
    logits = logits.detach().float().cpu()
    labels = torch.as_tensor(labels).cpu().long()
    num_classes = logits.shape[1]
    result = {
        "accuracy": accuracy(logits, labels),
        "balanced_accuracy": balanced_accuracy(logits, labels, num_classes),
    }
    if num_classes == 2:
        result["auc"] = roc_auc(logits.softmax(dim=1)[:, 1], labels)
    return result


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and **population** std (ddof = 0, ``np.std``'s default) — what DC/DSA/DM/MTT code prints."""
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        return float("nan"), float("nan")
    return float(array.mean()), float(array.std(ddof=0))
