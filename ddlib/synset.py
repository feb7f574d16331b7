"""Synthetic sets: the learned images, their labels and everything needed to evaluate them later.

A ``SyntheticSet`` is one file (``synset.pt``): images in the dataset's normalised (or ZCA) space,
hard or soft labels, an optional learned learning rate, and metadata (dataset description, method,
config, seed, history). ``ddlib evaluate synset.pt`` needs no other flags because the file says how
it was made and how it should be evaluated.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ddlib.io import atomic_write, checksum, load_failure, plain

__all__ = ["SyntheticSet", "SynsetFormatError", "class_labels"]

FORMAT_VERSION = 1


class SynsetFormatError(ValueError):
    """A synthetic-set file that is corrupt, truncated, or holds tensors of the wrong shape or type."""


def class_labels(num_classes: int, per_class: int, device: str | torch.device = "cpu") -> Tensor:
    """Hard labels ``[0]*per_class + [1]*per_class + ...``: shape [num_classes * per_class], int64."""
    return torch.arange(num_classes, device=device).repeat_interleave(per_class)


@dataclass
class SyntheticSet:
    """Learned (or selected) training images with their labels.

    images: [N, C, H, W] float32 in the dataset's normalised space (ZCA space when meta["dataset"]["zca"]).
    labels: [N] int64 class indices, or [N, K] float soft labels (logits, as DATM learns them).
    lr:     a learned learning rate for evaluation (scalar tensor) or per-step rates (DD), else None.
    meta:   plain values only (str, int, float, bool, None, lists, dicts, tensors): "dataset" (the
            RealSet.meta() it was made from), "zca_state" (when whitened), "method", "config", "seed",
            "iterations", "history", "protocol" (how to evaluate it), ...
    """

    images: Tensor
    labels: Tensor
    lr: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate(self.images, self.labels, self.lr)

    # ------------------------------------------------------------------ shape facts
    @property
    def num_classes(self) -> int:
        if "dataset" in self.meta:
            return int(self.meta["dataset"]["num_classes"])
        return int(self.labels.shape[1] if self.soft_labels else self.labels.max().item() + 1)

    @property
    def soft_labels(self) -> bool:
        return self.labels.dim() == 2

    @property
    def hard_labels(self) -> Tensor:
        """[N] int64: the argmax of soft labels, or the hard labels themselves."""
        return self.labels.argmax(dim=1) if self.soft_labels else self.labels

    @property
    def images_per_class(self) -> int:
        """The IPC the set was distilled with (its config), else the images of its smallest class. Learned
        soft labels can move an image's argmax to another class, so counting would under-report those."""
        ipc = (self.meta.get("config") or {}).get("ipc")
        if ipc is not None and int(ipc) * self.num_classes == len(self):
            return int(ipc)
        counts = torch.bincount(self.hard_labels.cpu(), minlength=self.num_classes)
        return int(counts.min().item())

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: str | torch.device) -> "SyntheticSet":
        lr = None if self.lr is None else self.lr.to(device)
        return SyntheticSet(self.images.to(device), self.labels.to(device), lr, self.meta)

    def of_class(self, c: int) -> Tensor:
        """The images whose (hard) label is ``c``: [n_c, C, H, W]."""
        return self.images[self.hard_labels == c]

    def denormalised(self) -> Tensor:
        """Images back in pixel scale [0, 1] (clipped) for display: [N, C, H, W] on the CPU."""
        from ddlib.data import denormalise

        x = self.images.detach().cpu().float()
        dataset = self.meta.get("dataset", {})
        mean, std = dataset.get("mean", [0.0] * x.shape[1]), dataset.get("std", [1.0] * x.shape[1])
        return denormalise(x, mean, std, self.meta.get("zca_state")).clamp(0, 1)

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the set to ``path`` atomically, with a checksum of its tensors."""
        payload = {
            "format": "ddlib.SyntheticSet",
            "version": FORMAT_VERSION,
            "images": self.images.detach().cpu().contiguous(),
            "labels": self.labels.detach().cpu().contiguous(),
            "lr": None if self.lr is None else self.lr.detach().cpu(),
            "meta": _plain(self.meta),
        }
        payload["checksum"] = _checksum(payload)
        return atomic_write(path, lambda f: torch.save(payload, f))

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "SyntheticSet":
        """Read a set saved by ``save``. Never runs code from the file (``weights_only=True``) and
        checks the format, the checksum, the shapes and that every value is finite."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no synthetic set at {path}")
        redo = "copy the file again or re-run the command that wrote it"
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 -- truncated zip, a pickle that wants to run code, garbage bytes
            reason = load_failure(exc)
            raise SynsetFormatError(f"{path} is not a readable synthetic-set file ({type(exc).__name__}: "
                                    f"{reason}); {redo}") from None
        if not isinstance(payload, dict) or payload.get("format") != "ddlib.SyntheticSet":
            raise SynsetFormatError(f"{path} is not a ddlib synthetic-set file")
        if payload.get("checksum") != _checksum(payload):
            raise SynsetFormatError(f"{path} is corrupt: its checksum does not match its contents; {redo}")
        if not isinstance(payload["meta"], dict):
            raise SynsetFormatError(f"{path}: meta must be a dict, got {type(payload['meta']).__name__}")
        try:
            synset = cls(payload["images"], payload["labels"], payload["lr"], payload["meta"])
        except SynsetFormatError as exc:
            raise SynsetFormatError(f"{path}: {exc}") from None
        _check_classes(synset, path)
        return synset.to(map_location)


def _validate(images: Tensor, labels: Tensor, lr: Tensor | None) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise SynsetFormatError(f"images must be a float tensor [N, C, H, W], got "
                                f"{getattr(images, 'shape', type(images).__name__)}")
    n = images.shape[0]
    if not isinstance(labels, Tensor) or labels.shape[0] != n:
        raise SynsetFormatError(f"labels must have one row per image ({n}), got "
                                f"{getattr(labels, 'shape', type(labels).__name__)}")
    if labels.dim() == 1 and labels.dtype != torch.int64:
        raise SynsetFormatError(f"hard labels must be int64, got {labels.dtype}")
    if labels.dim() == 2 and not labels.is_floating_point():
        raise SynsetFormatError("soft labels [N, K] must be floating point")
    if labels.dim() not in (1, 2):
        raise SynsetFormatError(f"labels must be [N] or [N, K], got {tuple(labels.shape)}")
    for name, t in (("images", images), ("labels", labels), ("lr", lr)):
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise SynsetFormatError(f"{name} contain NaN or infinite values")


def _checksum(payload: dict) -> str:
    """sha256 over every tensor's bytes and every plain value in the payload (bar the checksum itself)."""
    return checksum({k: payload.get(k) for k in ("images", "labels", "lr", "meta")})


def _check_classes(synset: "SyntheticSet", path: Path) -> None:
    """Labels within the classes the set's dataset declares: hard in [0, K), soft with K columns."""
    k = (synset.meta.get("dataset") or {}).get("num_classes")
    if k is None:
        return
    labels = synset.labels
    if synset.soft_labels and labels.shape[1] != int(k):
        raise SynsetFormatError(f"{path}: soft labels have {labels.shape[1]} columns but the set declares {k} classes")
    if not synset.soft_labels and len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < int(k)):
        raise SynsetFormatError(f"{path}: labels {int(labels.min())}..{int(labels.max())} fall outside the "
                                f"{k} classes the set declares")


_plain = plain
