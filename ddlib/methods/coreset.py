"""Coreset baselines: pick real training images instead of learning new ones (DC paper, Table 1).

* ``random``  — ``images_per_class`` distinct images per class, drawn like ``RealSet.sample``.
* ``herding`` — Welling (2009), as in DC's baseline: greedily add the image whose feature brings the
  running mean of the selected features closest to the class mean.
* ``kcenter`` — greedy k-center (Sener & Savarese 2018): start from the image nearest the class mean,
  then repeatedly add the image farthest from everything selected so far.

Herding and k-center work in the embedding (``net.embed``, [B, D]) of a randomly initialised network
seeded from ``seed``, as the DC baselines do. Every result is a ``SyntheticSet`` ordered by class whose
``meta["source_indices"]`` lists the chosen rows of ``real.train_images``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ddlib.rng import derive_seed, generator
from ddlib.synset import SyntheticSet, class_labels

__all__ = ["SELECTORS", "select", "select_herding", "select_kcenter", "select_random"]


# ---------------------------------------------------------------------------------------------- public API
def select_random(real: Any, images_per_class: int, *, seed: int = 0) -> SyntheticSet:
    """``images_per_class`` distinct random train images of every class.

    Draws exactly what ``real.sample(c, images_per_class, g)`` would for c = 0, 1, ... with one
    generator ``ddlib.rng.generator(seed, "coreset-random")``, but keeps the row indices for the meta.
    """
    _check_class_sizes(real, images_per_class)
    g = generator(seed, "coreset-random")
    picks = []
    for c in range(real.num_classes):
        rows = _class_rows(real, c)
        picks.append(rows[torch.randperm(len(rows), generator=g)[:images_per_class]])
    config = {"images_per_class": images_per_class}
    return _to_synset(real, torch.cat(picks), "random", config, seed)


def select_herding(real: Any, images_per_class: int, *, model: str | nn.Module = "convnet", seed: int = 0,
                   device: str | torch.device = "cpu", batch_size: int = 512) -> SyntheticSet:
    """Herding selection per class in the embedding of a random ``model`` (a registered name, or a
    module with ``.embed``)."""
    return _select_by_features(real, images_per_class, _herding_order, "herding",
                               model=model, seed=seed, device=device, batch_size=batch_size)


def select_kcenter(real: Any, images_per_class: int, *, model: str | nn.Module = "convnet", seed: int = 0,
                   device: str | torch.device = "cpu", batch_size: int = 512) -> SyntheticSet:
    """Greedy k-center selection per class in the embedding of a random ``model``."""
    return _select_by_features(real, images_per_class, _kcenter_order, "kcenter",
                               model=model, seed=seed, device=device, batch_size=batch_size)


SELECTORS: dict[str, Callable[..., SyntheticSet]] = {
    "random": select_random,
    "herding": select_herding,
    "kcenter": select_kcenter,
}


def select(method: str, real: Any, images_per_class: int, **kwargs: Any) -> SyntheticSet:
    """Dispatch to ``select_<method>``: "random" | "herding" | "kcenter" ("k-center" also accepted)."""
    key = method.lower().replace("-", "").replace("_", "")
    if key not in SELECTORS:
        raise ValueError(f"unknown coreset method {method!r}; choose one of {', '.join(SELECTORS)}")
    return SELECTORS[key](real, images_per_class, **kwargs)


# ---------------------------------------------------------------------------------------------- greedy orders
def _herding_order(features: Tensor, k: int) -> Tensor:
    """Indices [k] of ``features`` [n, D] chosen by herding: each step adds the row that brings the mean
    of the selected rows closest (Euclidean) to the mean of all rows. No row is chosen twice."""
    target = features.mean(dim=0)
    selected_sum = torch.zeros_like(target)
    available = torch.ones(len(features), dtype=torch.bool, device=features.device)
    order = []
    for step in range(1, k + 1):
        candidate_means = (selected_sum + features) / step                 # [n, D]: the mean if row i joined
        distance = (candidate_means - target).pow(2).sum(dim=1)
        best = int(distance.masked_fill(~available, float("inf")).argmin())
        order.append(best)
        available[best] = False
        selected_sum += features[best]
    return torch.tensor(order, dtype=torch.int64)


def _kcenter_order(features: Tensor, k: int) -> Tensor:
    """Indices [k] of ``features`` [n, D] by greedy k-center: the row nearest the mean first, then
    repeatedly the row whose distance to its nearest selected row is largest."""
    first = int((features - features.mean(dim=0)).pow(2).sum(dim=1).argmin())
    order = [first]
    min_distance = (features - features[first]).pow(2).sum(dim=1)        # [n] squared distance to the set
    min_distance[first] = -float("inf")  # so duplicates of a chosen row (distance 0) still beat it
    for _ in range(k - 1):
        best = int(min_distance.argmax())
        order.append(best)
        min_distance = torch.minimum(min_distance, (features - features[best]).pow(2).sum(dim=1))
        min_distance[order] = -float("inf")
    return torch.tensor(order, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------- helpers
def _select_by_features(real: Any, images_per_class: int, order_fn: Callable[[Tensor, int], Tensor],
                        name: str, *, model: str | nn.Module, seed: int, device: str | torch.device,
                        batch_size: int) -> SyntheticSet:
    """Per class: embed the class's train images, then keep the rows ``order_fn`` picks."""
    _check_class_sizes(real, images_per_class)
    net = _feature_net(real, model, seed, device)
    picks = []
    for c in range(real.num_classes):
        rows = _class_rows(real, c)
        features = _embed(net, real.train_images, rows, batch_size, device)
        picks.append(rows[order_fn(features, images_per_class).cpu()])
    model_name = model if isinstance(model, str) else type(model).__name__
    config = {"images_per_class": images_per_class, "model": model_name, "feature_dim": int(features.shape[1])}
    return _to_synset(real, torch.cat(picks), name, config, seed)


def _feature_net(real: Any, model: str | nn.Module, seed: int, device: str | torch.device) -> nn.Module:
    """A randomly initialised network seeded from ``seed`` (or the given module), in eval mode."""
    if isinstance(model, nn.Module):
        return model.to(device).eval()
    from ddlib.models import (
        get_network,  # late import: building a coreset needs models, importing it does not
    )

    net = get_network(model, real.channels, real.num_classes, real.image_size,
                      seed=derive_seed(seed, "coreset-net"), device=device)
    return net.eval()  # eval: BatchNorm variants then embed each image independently of its batch


@torch.no_grad()
def _embed(net: nn.Module, images: Tensor, rows: Tensor, batch_size: int, device: str | torch.device) -> Tensor:
    """Float32 embeddings [len(rows), D] on ``device`` of ``images[rows]``, ``batch_size`` at a time."""
    chunks = []
    for start in range(0, len(rows), batch_size):
        batch = images[rows[start:start + batch_size].to(images.device)].to(device)
        chunks.append(net.embed(batch).float().flatten(1))
    return torch.cat(chunks)


def _class_rows(real: Any, c: int) -> Tensor:
    """Ascending train-set rows [n_c] (CPU int64) of class ``c`` — the order ``RealSet`` indexes them in."""
    return torch.nonzero(real.train_labels.cpu() == c).flatten()


def _check_class_sizes(real: Any, images_per_class: int) -> None:
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
    counts = torch.bincount(real.train_labels.cpu(), minlength=real.num_classes)
    small = [c for c in range(real.num_classes) if int(counts[c]) < images_per_class]
    if small:
        names = getattr(real, "class_names", [str(c) for c in range(real.num_classes)])
        detail = ", ".join(f"class {c} ({names[c]!r}) has {int(counts[c])}" for c in small)
        raise ValueError(f"cannot select {images_per_class} distinct images per class: {detail}; "
                         f"use images_per_class <= {int(counts.min())}")


def _to_synset(real: Any, indices: Tensor, method: str, config: dict, seed: int) -> SyntheticSet:
    """The chosen rows (ordered by class, ``images_per_class`` each) as a SyntheticSet with provenance."""
    images = real.train_images[indices.to(real.train_images.device)].detach().clone()
    labels = class_labels(real.num_classes, config["images_per_class"], device=images.device)
    meta = {"dataset": real.meta(), "method": method, "config": config, "seed": seed,
            "source_indices": indices.tolist()}
    if getattr(real, "zca", None) is not None:
        meta["zca_state"] = real.zca  # selected rows live in ZCA space; plots need the inverse
    return SyntheticSet(images, labels, None, meta)
