"""Neural architecture search with a proxy set (the DC/DM/DataDAM papers' NAS application).

Every candidate ConvNet is trained briefly on a small proxy set (a distilled set, a coreset) and, for the
reference ranking, on the real training images; both are scored on a **validation split carved from the
training data**. The test set is never used to choose: ``search`` refuses a ``RealSet`` whose test split is
not the validation split made by ``validation_split``. How well the proxy ranks the architectures is the
Spearman rank correlation between the two rankings; what it saves is the ratio of the search times.

    train_part, val = validation_split(real, 0.1)          # distil from train_part, never from val
    proxy = distill("datadam", train_part, ipc=10)
    result = search(convnet_grid(), proxy, val, proxy_protocol="course", real_protocol="course")
    result.spearman, result.best_proxy, result.best_real
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ddlib.data import RealSet
from ddlib.evaluate import Protocol, check_compatible, evaluate, get_protocol
from ddlib.methods.coreset import select_random
from ddlib.metrics import _average_ranks
from ddlib.rng import generator
from ddlib.synset import SyntheticSet

__all__ = ["NASResult", "convnet_grid", "search", "spearman", "validation_split"]

VALIDATION_ROLE = "validation"  # RealSet.info["role"] of the set whose test split is held-out training data


# ---------------------------------------------------------------------------------------------- candidates
def convnet_grid(depths=(2, 3, 4), widths=(32, 64, 128, 256), acts=("relu", "sigmoid"),
                 norms=("instance", "none"), pools=("avg", "max"), limit: int | None = None,
                 seed: int = 0) -> list[dict]:
    """ConvNet variants to rank: one dict of ``get_network("convnet", ...)`` overrides per variant, plus a
    readable ``"name"`` such as ``"D3-W128-relu-instance-avg"``.

    The default grid is 3 x 4 x 2 x 2 x 2 = 96 variants. ``limit`` keeps a seeded random ``limit`` of them
    (in grid order) so every axis stays represented, unlike the first ``limit``.
    """
    grid = [{"name": f"D{d}-W{w}-{a}-{n}-{p}", "depth": d, "width": w, "act": a, "norm": n, "pool": p}
            for d, w, a, n, p in itertools.product(depths, widths, acts, norms, pools)]
    if limit is not None and limit < len(grid):
        keep = torch.randperm(len(grid), generator=generator(seed, "nas-grid"))[:limit].sort().values
        grid = [grid[i] for i in keep.tolist()]
    return grid


def _model_and_overrides(candidate: dict) -> tuple[str, dict]:
    """``("convnet", {depth, width, ...})`` from a candidate; an optional ``"model"`` key picks another model."""
    overrides = {k: v for k, v in candidate.items() if k not in ("name", "model")}
    return candidate.get("model", "convnet"), overrides


# ---------------------------------------------------------------------------------------------- validation split
def _subset(real: RealSet, train_rows: Tensor, test_rows: Tensor, role: str, info: dict) -> RealSet:
    """A RealSet of ``real``'s training rows: train = ``train_rows``, test = ``test_rows`` (both [n] int64).

    Built directly (not by ``from_tensors``) so the images keep ``real``'s normalisation / ZCA; the name stays
    ``real.name`` so evaluation picks the same DSA strategy (no flips for digits).
    """
    x, y = real.train_images, real.train_labels
    return dataclasses.replace(real, train_images=x[train_rows.to(x.device)], train_labels=y[train_rows.to(y.device)],
                               test_images=x[test_rows.to(x.device)], test_labels=y[test_rows.to(y.device)],
                               info={**real.info, **info, "role": role})


def validation_split(real: RealSet, fraction: float = 0.1, seed: int = 0) -> tuple[RealSet, RealSet]:
    """Carve a stratified validation split out of ``real``'s TRAINING images (the test set is never used).

    Every class gives ``round(fraction * n_c)`` images (at least 1, leaving at least 1 for training), drawn
    with ``generator(seed, "nas-validation")``. Returns ``(train_part, val)``:

    * ``train_part``: train = the remaining training images, test = empty (distil the proxy from this, so the
      proxy never sees a validation image);
    * ``val``: train = the same remaining images, test = the held-out training images; ``search`` trains the
      reference on ``val.train`` and scores everything on ``val.test``.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    g = generator(seed, "nas-validation")
    labels = real.train_labels.cpu()
    held = []
    for c in range(real.num_classes):
        rows = torch.nonzero(labels == c).flatten()
        if len(rows) < 2:
            raise ValueError(f"class {c} has {len(rows)} training images; a validation split needs 2 or more")
        n_val = min(max(1, round(fraction * len(rows))), len(rows) - 1)
        held.append(rows[torch.randperm(len(rows), generator=g)[:n_val]])
    val_rows = torch.cat(held).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val_rows] = False
    train_rows = torch.nonzero(keep).flatten()
    info = {"validation_of": real.name, "validation_fraction": fraction, "validation_seed": seed,
            "validation_size": len(val_rows)}
    empty = torch.zeros(0, dtype=torch.int64)
    return (_subset(real, train_rows, empty, "train-part", info),
            _subset(real, train_rows, val_rows, VALIDATION_ROLE, info))


# ---------------------------------------------------------------------------------------------- ranking
def spearman(a, b) -> float:
    """Spearman rank correlation in [-1, 1] of two equal-length sequences: rank each (ties get the mean of
    their ranks), then the Pearson correlation of the ranks. NaN when either is constant (as scipy)."""
    ra = _average_ranks(torch.as_tensor(np.asarray(a, dtype=np.float64)).flatten())
    rb = _average_ranks(torch.as_tensor(np.asarray(b, dtype=np.float64)).flatten())
    if len(ra) != len(rb) or len(ra) < 2:
        raise ValueError(f"spearman needs two sequences of the same length >= 2, got {len(ra)} and {len(rb)}")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float((ra.pow(2).sum() * rb.pow(2).sum()).sqrt())
    return float((ra * rb).sum()) / denominator if denominator > 0 else float("nan")


@dataclass
class NASResult:
    """A proxy search and the reference search over the same candidates, both scored on validation data."""

    table: pd.DataFrame          # one row per candidate: name, proxy/real validation accuracy, ranks, train seconds
    spearman: float              # rank correlation of proxy vs real validation accuracy, in [-1, 1]
    best_proxy: str              # the candidate the proxy search picks
    best_real: str               # the candidate the reference (real-data) search picks
    best_proxy_real_accuracy: float  # real-trained validation accuracy of the proxy's pick (vs the best)
    proxy_seconds: float         # wall-clock seconds of the whole proxy search (train + score)
    real_seconds: float          # wall-clock seconds of the whole reference search
    top_k: int                   # k of top_k_overlap
    top_k_overlap: float         # fraction of the real top-k candidates that are also in the proxy top-k

    @property
    def speedup(self) -> float:
        """How many times faster the proxy search ran than the reference search."""
        return self.real_seconds / self.proxy_seconds if self.proxy_seconds > 0 else float("inf")

    def summary(self) -> dict:
        """Plain values for metrics.json (everything but the per-candidate table)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "table"}
        return {**out, "num_candidates": len(self.table), "speedup": self.speedup}

    def __repr__(self) -> str:
        return (f"NASResult({len(self.table)} candidates, spearman={self.spearman:.3f}, "
                f"best_proxy={self.best_proxy!r}, "
                f"best_real={self.best_real!r}, search {self.proxy_seconds:.1f} s vs {self.real_seconds:.1f} s)")


def _train_and_score(images: Tensor, labels: Tensor, val: RealSet, candidate: dict, protocol: Protocol,
                     seed: int, lr: float | None, device) -> tuple[float, float]:
    """(validation accuracy in [0, 1], training seconds) of one fresh candidate network trained on
    (images, labels); the same ``seed`` gives the same initial network for the proxy and the real run."""
    model, overrides = _model_and_overrides(candidate)
    result = evaluate(images, labels, val, model=model, protocol=protocol, num_eval=1, seed=seed, lr=lr,
                      device=device, model_overrides=overrides)
    return result.accuracies[0], result.train_seconds[0]


def _timed_search(candidates, images, labels, val, protocol, seed, lr, device) -> tuple[list, list, float]:
    """Accuracies [n], train seconds [n] and total wall seconds of training/scoring every candidate."""
    start = time.perf_counter()
    scores = [_train_and_score(images, labels, val, c, protocol, seed, lr, device) for c in candidates]
    return [s[0] for s in scores], [s[1] for s in scores], time.perf_counter() - start


def search(candidates: list[dict], proxy: SyntheticSet | tuple[Tensor, Tensor], real: RealSet, *,
           proxy_protocol: str | Protocol = "course", real_protocol: str | Protocol = "course", seed: int = 0,
           device: str | torch.device = "cpu", real_subset: int | None = None, top_k: int = 5) -> NASResult:
    """Rank ``candidates`` by validation accuracy after training on ``proxy`` and on ``real.train``.

    ``real`` must be the ``val`` set of ``validation_split``: its test split is held-out TRAINING data, the
    only data used to choose (a RealSet whose test split is the real test set is refused). ``proxy`` is a
    SyntheticSet (its learned lr is used when the protocol allows it) or (images [N, C, H, W], labels).
    ``real_subset`` trains the reference on a class-balanced ``real_subset // K`` images per class instead
    of all of ``real.train`` (a cheaper, noisier reference). Accuracies are fractions in [0, 1]; seconds are
    wall-clock.
    """
    if real.info.get("role") != VALIDATION_ROLE:
        raise ValueError("search scores candidates on real.test, which must be a validation split of the "
                         "training data: pass the second set returned by validation_split(real), never a set "
                         "whose test split is the real test set")
    lr = None
    if isinstance(proxy, SyntheticSet):
        check_compatible(proxy, real)
        use_lr = proxy.lr is not None and proxy.lr.numel() == 1 and get_protocol(proxy_protocol).use_learned_lr
        lr = proxy.lr.item() if use_lr else None
        proxy = (proxy.images, proxy.labels)
    real_x, real_y = real.train
    if real_subset is not None:
        subset = select_random(real, max(1, real_subset // real.num_classes), seed=seed)
        real_x, real_y = subset.images, subset.labels
    proxy_acc, proxy_sec, proxy_total = _timed_search(candidates, *proxy, real, get_protocol(proxy_protocol),
                                                      seed, lr, device)
    real_acc, real_sec, real_total = _timed_search(candidates, real_x, real_y, real, get_protocol(real_protocol),
                                                   seed, None, device)
    table = pd.DataFrame({"name": [c.get("name", str(c)) for c in candidates],
                          "proxy_accuracy": proxy_acc, "real_accuracy": real_acc,
                          "proxy_train_seconds": proxy_sec, "real_train_seconds": real_sec})
    table["proxy_rank"] = table["proxy_accuracy"].rank(ascending=False, method="min").astype(int)
    table["real_rank"] = table["real_accuracy"].rank(ascending=False, method="min").astype(int)
    best_proxy, best_real = table.loc[table["proxy_accuracy"].idxmax()], table.loc[table["real_accuracy"].idxmax()]
    k = min(top_k, len(table))

    def top(column: str) -> set:
        return set(table.nlargest(k, column)["name"])

    return NASResult(table=table, spearman=spearman(proxy_acc, real_acc), best_proxy=best_proxy["name"],
                     best_real=best_real["name"], best_proxy_real_accuracy=float(best_proxy["real_accuracy"]),
                     proxy_seconds=proxy_total, real_seconds=real_total, top_k=k,
                     top_k_overlap=len(top("proxy_accuracy") & top("real_accuracy")) / k)
