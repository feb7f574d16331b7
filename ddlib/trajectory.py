"""Expert trajectories and the pieces trajectory matching is built from (algorithms.md sections 6-8).

* ``train_experts`` trains networks on the real set and keeps each one's flat parameters after every
  epoch: one file per expert (``expert_0000.pt``: a tensor [epochs + 1, P], epoch 0 = the init), written
  atomically, plus ``index.json`` with the settings and a sha256 of every file. A run resumes at the
  first missing expert; a corrupt file is an error, never skipped; a folder holds one kind of expert.
* ``load_experts`` reads a folder back, verifying every file once.
* ``ensure_experts`` trains what a folder lacks and loads it; ``experts_folder`` names the folder that
  notebooks asking for the same experts share.
* ``FlatModel`` runs a network from one flat parameter vector with ``torch.func.functional_call``.
* ``parameter_distance`` is MTT's normalised matching loss; ``depth_keep`` and ``loss_keep`` are PAD's
  parameter filters.
* ``el2n_scores``, ``difficulty_order`` and ``curriculum_indices`` give PAD's easy-to-hard data schedule.
* ``GSAM`` is FTD's flat-trajectory optimiser, used for DATM's and PAD's experts.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ddlib import distributed
from ddlib.augment import DSA, default_strategy
from ddlib.data import RealSet
from ddlib.io import checksum, load_json, load_tensors, save_json, save_tensors
from ddlib.models import get_network, has_batchnorm
from ddlib.rng import generator
from ddlib.utils import progress

__all__ = ["ExpertConfig", "ExpertFileError", "Experts", "FlatModel", "GSAM", "train_experts", "load_experts",
           "parameter_distance", "depth_keep", "loss_keep", "el2n_scores", "difficulty_order",
           "curriculum_indices", "curriculum_fractions", "expert_file", "experts_folder", "ensure_experts",
           "INDEX_FILE"]

INDEX_FILE = "index.json"
FORMAT = "ddlib.expert"
FORMAT_VERSION = 1


@dataclass
class ExpertConfig:
    """How expert networks are trained; defaults are MTT's buffer.py (SGD, lr 0.01, no momentum, no decay)."""

    num_experts: int = 10            # networks to train (MTT/DATM/PAD train 100)
    epochs: int = 50                 # epochs per expert (MTT 50; DATM/PAD 100, as their windows reach 40-60)
    model: str = "convnet"           # the network (no BatchNorm: its running statistics are not parameters)
    lr: float = 0.01                 # SGD learning rate (lr_teacher), constant (no decay)
    momentum: float = 0.0            # SGD momentum (0 in MTT, DATM and PAD)
    weight_decay: float = 0.0        # SGD weight decay (0 in all three)
    batch_size: int = 256            # real images per step
    optimizer: str = "sgd"           # sgd (MTT) | gsam (FTD's flat trajectories; DATM and PAD)
    rho: float = 0.01                # gsam: perturbation radius (rho_max = rho_min = 0.01)
    alpha: float = 0.3               # gsam: weight of the surrogate-gap (orthogonal) correction
    adaptive: bool = True            # gsam: perturbation scaled element-wise by |w| (FTD's setting)
    dsa: bool = True                 # non-siamese DSA on every batch (MTT's buffer.py default)
    dsa_strategy: str = ""           # "" = the dataset's default strategy
    subset: int = 0                  # real images per class the experts see (0 = all), for CPU budgets
    half: bool = False               # store parameters as float16 (half the disk; matching runs in float32)
    snapshots_per_epoch: int = 1     # parameters saved k times per epoch, evenly over its batches (MTT: 1);
                                     # k > 1 gives nearer targets: the methods' epochs then count snapshots
    curriculum: bool = False         # PAD's easy-to-hard schedule over EL2N scores (the fields below)
    init_ratio: float = 0.75         # curriculum: easiest fraction of every class at epoch 0
    add_end_epoch: int = 20          # curriculum: epoch at which all data is in
    rm_epoch_first: int = 40         # curriculum: after this epoch drop the easiest rm_easy_ratio_first
    rm_epoch_second: int = 60        # curriculum: after this epoch drop the easiest rm_easy_ratio_second
    rm_easy_ratio_first: float = 0.1   # curriculum: fraction of each class dropped after rm_epoch_first
    rm_easy_ratio_second: float = 0.2  # curriculum: fraction of each class dropped after rm_epoch_second
    score_nets: int = 3              # curriculum: networks the EL2N score is averaged over
    score_epochs: int = 2            # curriculum: epochs each scoring network is trained (early training)

    # the expert parameters of notebooks 07-10, by the config field each one sets
    NOTEBOOK_PARAMETERS: ClassVar[dict[str, str]] = {
        "num_experts": "num_experts", "expert_train_epochs": "epochs", "model": "model",
        "expert_optimizer": "optimizer", "expert_subset": "subset", "expert_batch": "batch_size",
        "expert_half": "half", "init_ratio": "init_ratio", "add_end_epoch": "add_end_epoch",
        "rm_epoch_first": "rm_epoch_first", "rm_epoch_second": "rm_epoch_second", "score_nets": "score_nets",
        "score_epochs": "score_epochs", "expert_snapshots_per_epoch": "snapshots_per_epoch"}

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any], **fields: Any) -> "ExpertConfig":
        """The config a notebook's parameters name (``expert_train_epochs`` sets ``epochs``, ...: see
        ``NOTEBOOK_PARAMETERS``; other names are ignored, absent ones keep the defaults); ``fields`` override."""
        named = {field: parameters[name] for name, field in cls.NOTEBOOK_PARAMETERS.items() if name in parameters}
        return cls(**{**named, **fields})

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "gsam"):
            raise ValueError(f"unknown expert optimizer {self.optimizer!r}; use sgd (MTT) or gsam (DATM, PAD)")
        if self.num_experts < 1 or self.epochs < 1:
            raise ValueError(f"need num_experts >= 1 and epochs >= 1, got {self.num_experts} and {self.epochs}")
        if self.snapshots_per_epoch < 1:
            raise ValueError(f"need snapshots_per_epoch >= 1, got {self.snapshots_per_epoch}")


class ExpertFileError(ValueError):
    """An expert folder that is corrupt, incomplete or holds experts of other settings."""


# ------------------------------------------------------------------------------------ flat parameters
class FlatModel:
    """A network run from one flat parameter vector [P] (``named_parameters`` order: shallow -> deep).

    The module is only a template: ``model(flat, x)`` is ``functional_call`` with views of ``flat``, so
    gradients flow to ``flat``. Networks with buffers (BatchNorm's running statistics) are refused: their
    state would not be part of the trajectory.
    """

    def __init__(self, net: nn.Module):
        if has_batchnorm(net) or any(True for _ in net.buffers()):
            raise ValueError(f"{type(net).__name__} has BatchNorm or other buffers; trajectory matching needs a "
                             "network whose whole state is its parameters (use instance norm, e.g. 'convnet')")
        self.net = net
        self.names = [name for name, _ in net.named_parameters()]
        self.shapes = [p.shape for _, p in net.named_parameters()]
        self.sizes = [p.numel() for _, p in net.named_parameters()]
        self.num_params = sum(self.sizes)

    def flatten(self, net: nn.Module | None = None) -> Tensor:
        """A detached copy of the parameters of ``net`` (default: the template) as one vector [P]."""
        return torch.cat([p.detach().reshape(-1) for p in (net or self.net).parameters()]).clone()

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """{name: view of ``flat`` in the parameter's shape}."""
        return {name: part.view(shape)
                for name, part, shape in zip(self.names, flat.split(self.sizes), self.shapes)}

    def __call__(self, flat: Tensor, x: Tensor) -> Tensor:
        """The network's output for x [B, C, H, W] with parameters ``flat`` [P]."""
        return functional_call(self.net, self.unflatten(flat), (x,))

    @torch.no_grad()
    def load_into(self, flat: Tensor, net: nn.Module | None = None) -> nn.Module:
        """Copy ``flat`` into the parameters of ``net`` (default: the template)."""
        net = net or self.net
        for p, value in zip(net.parameters(), flat.split(self.sizes)):
            p.copy_(value.view_as(p))
        return net

    def layers(self) -> list[list]:
        """[[name, numel], ...] in flat order (for the index file and PAD's depth cut)."""
        return [[name, size] for name, size in zip(self.names, self.sizes)]


# ------------------------------------------------------------------------------------ matching loss
def parameter_distance(student: Tensor, target: Tensor, start: Tensor,
                       keep: Tensor | slice | None = None) -> Tensor:
    """MTT's loss ||student - target||^2 / ||start - target||^2 over flat vectors [P] (a scalar).

    keep: the entries to compare (PAD): a slice, a bool mask [P] or per-entry weights [P]; None = all.
    0 when the student lands on the target, 1 when it stays at the start.
    """
    num, den = (student - target).pow(2), (start - target).pow(2)
    if isinstance(keep, slice):
        num, den = num[keep], den[keep]
    elif keep is not None:
        num, den = num * keep, den * keep
    return num.sum() / den.sum()


def depth_keep(num_params: int, drop_ratio: float) -> slice:
    """PAD (paper, Eq. 4): keep every entry but the first floor(drop_ratio * P) (the shallow ones)."""
    if not 0.0 <= drop_ratio < 1.0:
        raise ValueError(f"drop_ratio must be in [0, 1), got {drop_ratio}")
    return slice(int(drop_ratio * num_params), num_params)


def loss_keep(errors: Tensor, drop_ratio: float) -> Tensor:
    """PAD's released code: a 0/1 mask [P] dropping the floor(drop_ratio * P) entries of smallest ``errors``."""
    drop = int(drop_ratio * errors.numel())
    keep = torch.ones_like(errors)
    if drop == 0:
        return keep
    smallest = torch.topk(errors.detach(), drop, largest=False).indices
    return keep.index_fill_(0, smallest, 0.0)


# ------------------------------------------------------------------------------------ GSAM
class GSAM:
    """GSAM (Zhuang et al., 2022) around a base optimiser, as FTD's flat-trajectory expert training.

    One step: g = grad L(w); perturb w by e = rho * g * (w^2 if adaptive) / ||(|w| if adaptive) * g||;
    g_adv = grad L(w + e); the update direction is g_adv - alpha * (g's component orthogonal to g_adv),
    taken by the base optimiser from the unperturbed w.
    """

    def __init__(self, params: list[Tensor], base: torch.optim.Optimizer, rho: float = 0.01, alpha: float = 0.3,
                 adaptive: bool = True, eps: float = 1e-12):
        self.params, self.base = list(params), base
        self.rho, self.alpha, self.adaptive, self.eps = rho, alpha, adaptive, eps

    def step(self, loss_fn: Callable[[], Tensor]) -> Tensor:
        """One update for the loss ``loss_fn()`` (evaluated twice); returns the unperturbed loss."""
        loss = loss_fn()
        grads = torch.autograd.grad(loss, self.params)
        with torch.no_grad():
            scaled = [g * p.abs() if self.adaptive else g for g, p in zip(grads, self.params)]
            norm = _norm(scaled)
            shifts = [self.rho * g * (p * p if self.adaptive else 1.0) / (norm + self.eps)
                      for g, p in zip(grads, self.params)]
            for p, e in zip(self.params, shifts):
                p.add_(e)
        adv = torch.autograd.grad(loss_fn(), self.params)
        with torch.no_grad():
            old_norm, new_norm = _norm(grads), _norm(adv)
            inner = sum((g * a).sum() for g, a in zip(grads, adv))
            cosine = inner / (old_norm * new_norm + self.eps)
            for p, e, g, a in zip(self.params, shifts, grads, adv):
                vertical = g - cosine * old_norm * a / (new_norm + self.eps)
                p.sub_(e)
                p.grad = a - self.alpha * vertical
        self.base.step()
        return loss.detach()


def _norm(tensors: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


# ------------------------------------------------------------------------------------ difficulty (PAD)
def el2n_scores(real: RealSet, *, indices: Tensor | None = None, model: str = "convnet", num_nets: int = 3,
                epochs: int = 2, lr: float = 0.01, batch_size: int = 256, seed: int = 0,
                device: str | torch.device = "cpu") -> Tensor:
    """EL2N difficulty of training images: ||softmax(f(x)) - onehot(y)||_2 averaged over ``num_nets``
    networks trained ``epochs`` epochs (SGD momentum 0.9, no augmentation). [n] float, higher = harder.

    indices: the training images to score and train on (default: all), CPU long [n].
    """
    from ddlib.evaluate import Protocol, train_network

    device = torch.device(device)
    idx = torch.arange(real.train_labels.shape[0]) if indices is None else indices
    x, y = real.train_images[idx.to(real.train_images.device)].to(device), real.train_labels[idx].to(device)
    protocol = Protocol(name="el2n", epochs=epochs, lr=lr, batch_size=batch_size, schedule="constant",
                        augment="none", extra_epoch=False)
    total = torch.zeros(len(idx), device=device)
    for i in range(num_nets):
        net = get_network(model, real.channels, real.num_classes, real.image_size,
                          generator=generator(seed, "el2n-net", i), device=device)
        train_network(net, x, y, protocol, rng=generator(seed, "el2n-train", i))
        net.eval()
        with torch.no_grad():
            probs = torch.cat([net(part).softmax(dim=1) for part in x.split(1024)])
        total += (probs - F.one_hot(y, real.num_classes).float()).norm(dim=1)
    return (total / num_nets).cpu()


def difficulty_order(scores: Tensor, labels: Tensor, num_classes: int) -> list[Tensor]:
    """Per class, positions into ``scores``/``labels`` [n] sorted easy -> hard (ascending score, stable)."""
    labels = labels.cpu()
    order = []
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(1)
        order.append(members[scores[members].argsort(stable=True)])
    return order


def curriculum_fractions(epoch: int, cfg: ExpertConfig) -> tuple[float, float]:
    """(easy_dropped, kept_up_to) for expert epoch ``epoch`` (0-based), PAD's buffer_CL.py schedule:
    epochs <= add_end_epoch use the easiest min(1, IR + (1 - IR) * epoch / add_end_epoch) of each class;
    then all data until rm_epoch_first; then all but the easiest rm_easy_ratio_first until rm_epoch_second;
    then all but the easiest rm_easy_ratio_second."""
    if epoch <= cfg.add_end_epoch:
        ratio = 1.0 if cfg.add_end_epoch <= 0 else cfg.init_ratio + (1 - cfg.init_ratio) * epoch / cfg.add_end_epoch
        return 0.0, min(1.0, ratio)
    if epoch <= cfg.rm_epoch_first:
        return 0.0, 1.0
    if epoch <= cfg.rm_epoch_second:
        return cfg.rm_easy_ratio_first, 1.0
    return cfg.rm_easy_ratio_second, 1.0


def curriculum_indices(order: list[Tensor], epoch: int, cfg: ExpertConfig) -> Tensor:
    """The positions (into the scored set) that expert epoch ``epoch`` trains on: [m] long."""
    dropped, kept = curriculum_fractions(epoch, cfg)
    parts = []
    for members in order:
        n = members.numel()
        parts.append(members[int(dropped * n):max(1, int(kept * n))])
    return torch.cat(parts)


# ------------------------------------------------------------------------------------ expert training
def expert_file(i: int) -> str:
    return f"expert_{i:04d}.pt"


def _folder_config(cfg: ExpertConfig) -> dict[str, Any]:
    """The expert settings a folder records: all but num_experts, which may grow."""
    config = asdict(cfg)
    config.pop("num_experts")
    return config


def _settings(real: RealSet, cfg: ExpertConfig, seed: int) -> dict[str, Any]:
    """Everything that must agree between the experts of one folder (num_experts may grow)."""
    flat = FlatModel(get_network(cfg.model, real.channels, real.num_classes, real.image_size))
    settings = {"format": FORMAT, "version": FORMAT_VERSION, "seed": seed, "config": _folder_config(cfg),
                "dataset": real.meta(), "num_params": flat.num_params, "layers": flat.layers()}
    return json.loads(json.dumps(settings))  # tuples -> lists, as they come back from the file


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new))
                for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} there, {new!r} now"]


def _read_index(path: Path) -> dict:
    """An expert folder's index; a field added to ExpertConfig after it was written reads as its default
    (the experts were trained with it), so a later ddlib still resumes and reads an older folder."""
    index = load_json(path)
    settings = index.get("settings")
    if isinstance(settings, dict) and isinstance(settings.get("config"), dict):
        index["settings"] = {**settings, "config": {**_folder_config(ExpertConfig()), **settings["config"]}}
    return index


def _open_index(out: Path, settings: dict) -> dict:
    """The folder's index, created when missing; refuses experts trained with other settings."""
    path = out / INDEX_FILE
    if not path.exists():
        if any(out.glob("expert_*.pt")):
            raise ExpertFileError(f"{out} holds expert files but no {INDEX_FILE}; use an empty folder")
        return {"settings": settings, "num_experts": 0, "experts": {}}
    try:
        index = _read_index(path)
    except (OSError, json.JSONDecodeError) as exc:
        raise ExpertFileError(f"{path} is unreadable ({exc}); delete the folder or use another --out") from None
    diffs = _differences(index.get("settings"), settings)
    if diffs:
        raise ExpertFileError(f"{out} holds experts trained with other settings ({'; '.join(diffs[:4])}); "
                              "experts of different kinds (e.g. sgd and gsam) must not be mixed: use another --out")
    return index


def _read_expert(path: Path, expected: str | None) -> tuple[Tensor, str]:
    """A verified expert file's trajectory [E + 1, P] and its sha256; ExpertFileError when it is not sound."""
    hint = "delete it and run `ddlib experts` again to retrain that expert"
    try:
        payload = load_tensors(path)
    except Exception as exc:  # truncated zip, garbage bytes
        raise ExpertFileError(f"{path} is corrupt ({type(exc).__name__}); {hint}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ExpertFileError(f"{path} is not a ddlib expert file; {hint}")
    trajectory = payload.get("trajectory")
    digest = checksum(trajectory) if isinstance(trajectory, Tensor) else None
    if digest is None or digest != payload.get("sha256") or (expected is not None and digest != expected):
        raise ExpertFileError(f"{path} is corrupt: its checksum does not match; {hint}")
    return trajectory, digest


class _ExpertData:
    """The real images the experts train on: the subset, and the curriculum's order over it."""

    def __init__(self, real: RealSet, cfg: ExpertConfig, seed: int, out: Path, device: torch.device):
        self.cfg = cfg
        counts = real.class_counts
        if cfg.subset:
            g = generator(seed, "expert-subset")
            picks = [(real.train_labels.cpu() == c).nonzero().squeeze(1) for c in range(real.num_classes)]
            picks = [p[torch.randperm(p.numel(), generator=g)[:cfg.subset]] for p in picks]
            self.indices = torch.cat(picks).sort().values
        else:
            self.indices = torch.arange(int(counts.sum()))
        self.images = real.train_images[self.indices.to(real.train_images.device)].to(device)
        self.labels = real.train_labels[self.indices.to(real.train_labels.device)].to(device)
        self.order = self._difficulty(real, seed, out, device) if cfg.curriculum else None

    def _difficulty(self, real: RealSet, seed: int, out: Path, device: torch.device) -> list[Tensor]:
        path = out / "difficulty.pt"
        if path.exists():
            scores = load_tensors(path)["el2n"]
        else:
            scores = el2n_scores(real, indices=self.indices, model=self.cfg.model, num_nets=self.cfg.score_nets,
                                 epochs=self.cfg.score_epochs, seed=seed, device=device)
            save_tensors({"el2n": scores, "train_indices": self.indices}, path)
        return difficulty_order(scores, self.labels, real.num_classes)

    def epoch_positions(self, epoch: int) -> Tensor:
        """Positions into ``images`` that epoch ``epoch`` trains on (CPU long)."""
        if self.order is None:
            return torch.arange(self.labels.shape[0])
        return curriculum_indices(self.order, epoch, self.cfg)


def _train_expert(real: RealSet, cfg: ExpertConfig, data: _ExpertData, i: int, seed: int,
                  device: torch.device) -> tuple[Tensor, float]:
    """Expert ``i``: its trajectory [epochs * snapshots_per_epoch + 1, P] (CPU, float32) and its final test
    accuracy. Snapshot s of an epoch of B batches is taken after batch ceil(B s / k); where an epoch has
    fewer batches than k, snapshots repeat (the trajectory keeps its length)."""
    from ddlib.evaluate import test_network

    net = get_network(cfg.model, real.channels, real.num_classes, real.image_size,
                      generator=generator(seed, "expert", i, "init"), device=device)
    flat = FlatModel(net)
    base = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gsam = GSAM(list(net.parameters()), base, cfg.rho, cfg.alpha, cfg.adaptive) if cfg.optimizer == "gsam" else None
    dsa = DSA(cfg.dsa_strategy or default_strategy(real.name)) if cfg.dsa else None
    g = generator(seed, "expert", i, "train")
    snapshots = [flat.flatten().cpu()]
    net.train()
    for epoch in range(cfg.epochs):
        positions = data.epoch_positions(epoch)
        positions = positions[torch.randperm(positions.numel(), generator=g)]
        batches = positions.split(cfg.batch_size)
        ends = [-(-len(batches) * s // cfg.snapshots_per_epoch) for s in range(1, cfg.snapshots_per_epoch + 1)]
        snapshots.extend(flat.flatten().cpu() for _ in range(ends.count(0)))
        for b, batch in enumerate(batches, 1):
            batch = batch.to(device)
            x, y = data.images[batch], data.labels[batch]
            if dsa is not None:
                x = dsa(x, g)
            loss_fn = lambda x=x, y=y: F.cross_entropy(net(x), y)  # noqa: E731
            if gsam is not None:
                gsam.step(loss_fn)
            else:
                base.zero_grad(set_to_none=True)
                loss_fn().backward()
                base.step()
            snapshots.extend(flat.flatten().cpu() for _ in range(ends.count(b)))
    accuracy = test_network(net, real.test_images.to(device), real.test_labels.to(device))["accuracy"]
    return torch.stack(snapshots), accuracy


def train_experts(real: RealSet, cfg: ExpertConfig, out_dir: str | Path, *, seed: int = 0,
                  device: str | torch.device = "cpu", show_progress: bool = True) -> Path:
    """Train ``cfg.num_experts`` experts into ``out_dir`` (resumable) and return the folder.

    Expert i starts from ``generator(seed, "expert", i, "init")`` and draws its batches and augmentation
    from ``generator(seed, "expert", i, "train")``, so a resumed run writes the same files as an
    uninterrupted one. Existing expert files are verified (checksum) and kept; a corrupt one raises
    ExpertFileError; a folder made with other settings raises ExpertFileError.

    Under torchrun the experts are split round-robin across the ranks; each rank writes only its own
    expert files, and rank 0 writes the index (the same file a single process writes) after the others
    have finished.
    """
    out, device = Path(out_dir), torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    run = distributed.init(device)
    index = _open_index(out, _settings(real, cfg, seed))
    data = _expert_data(real, cfg, seed, out, device, index)
    mine = distributed.owned_items(range(cfg.num_experts), run)
    for i in progress(mine, desc="experts", total=len(mine), enable=show_progress and distributed.is_main()):
        path, entry = out / expert_file(i), index["experts"].get(str(i))
        if path.exists():
            _, digest = _read_expert(path, entry["sha256"] if entry else None)
            if entry is None:  # written, but the run stopped before the index was
                index["experts"][str(i)] = {"file": path.name, "sha256": digest}
            continue
        trajectory, accuracy = _train_expert(real, cfg, data, i, seed, device)
        trajectory = trajectory.half() if cfg.half else trajectory
        digest = checksum(trajectory)
        save_tensors({"format": FORMAT, "version": FORMAT_VERSION, "expert": i, "trajectory": trajectory,
                      "sha256": digest}, path)
        index["experts"][str(i)] = {"file": path.name, "sha256": digest, "test_accuracy": accuracy}
        if run is None:
            index["num_experts"] = len(index["experts"])
            save_json(index, out / INDEX_FILE)
    if run is not None:
        _merge_index(index, [index["experts"].get(str(i)) for i in mine], mine)
    if distributed.is_main():
        index["num_experts"] = len(index["experts"])
        save_json(index, out / INDEX_FILE)
    distributed.barrier()  # the index is complete before any rank returns
    return out


def _expert_data(real: RealSet, cfg: ExpertConfig, seed: int, out: Path, device: torch.device,
                 index: dict) -> _ExpertData:
    """The experts' data; under torchrun rank 0 first (it writes the index and the curriculum's scores),
    then the other ranks, which read them."""
    if distributed.launch() is None:
        return _ExpertData(real, cfg, seed, out, device)
    if distributed.is_main():
        save_json(index, out / INDEX_FILE)  # so that expert files never exist without an index
        data = _ExpertData(real, cfg, seed, out, device)
    distributed.barrier()
    if not distributed.is_main():
        data = _ExpertData(real, cfg, seed, out, device)
    return data


def _merge_index(index: dict, entries: list, mine: list[int]) -> None:
    """Every rank's entries for its own experts into ``index``, ordered by expert number (collective)."""
    merged = dict(index["experts"])
    for keys, values in distributed.gather_objects((mine, entries)):
        merged.update({str(i): e for i, e in zip(keys, values) if e is not None})
    index["experts"] = {k: merged[k] for k in sorted(merged, key=int)}


# ------------------------------------------------------------------------------------ loading
@dataclass
class Experts:
    """Expert trajectories read from a folder: ``experts[i]`` is [epochs + 1, P] (stored dtype, CPU)."""

    directory: Path
    settings: dict
    trajectories: list[Tensor]
    test_accuracies: list[float] = field(default_factory=list)  # final test accuracy of each (fractions)

    def __len__(self) -> int:
        return len(self.trajectories)

    def __getitem__(self, i: int) -> Tensor:
        return self.trajectories[i]

    @property
    def epochs(self) -> int:
        """Snapshots after the start: the training epochs times ``snapshots_per_epoch``, the unit in which the
        methods count start and target epochs."""
        return int(self.trajectories[0].shape[0]) - 1

    @property
    def snapshots_per_epoch(self) -> int:
        return int(self.config.get("snapshots_per_epoch", 1))

    @property
    def num_params(self) -> int:
        return int(self.settings["num_params"])

    @property
    def config(self) -> dict:
        return self.settings["config"]

    def final(self, i: int) -> Tensor:
        """Expert i's last parameters [P] as float32."""
        return self.trajectories[i][-1].float()

    def __str__(self) -> str:
        cfg = self.config
        kind = ("curriculum" if cfg.get("curriculum") else "plain") + f", {cfg.get('optimizer', 'sgd')}"
        accs = [100 * a for a in self.test_accuracies]
        k = self.snapshots_per_epoch
        span = f"{self.epochs} epochs" if k == 1 else f"{self.epochs} snapshots ({k} per epoch)"
        return (f"{len(self)} experts ({kind}) in {self.directory}: {span}, {self.num_params} "
                f"parameters" + (f"; final test accuracy {min(accs):.2f} to {max(accs):.2f} %" if accs else ""))


def load_experts(directory: str | Path, *, limit: int | None = None) -> Experts:
    """Read (and verify once) every expert listed in ``directory/index.json``; ``limit`` caps how many."""
    directory = Path(directory)
    path = directory / INDEX_FILE
    if not path.is_file():
        raise ExpertFileError(f"no expert trajectories in {directory} (no {INDEX_FILE}); train them with "
                              f"`python -m ddlib experts --out {directory} ...`")
    index = _read_index(path)
    keys = sorted(index.get("experts", {}), key=int)[:limit]
    if not keys:
        raise ExpertFileError(f"{directory} lists no finished experts; run `ddlib experts` to train some")
    trajectories = []
    for key in keys:
        entry = index["experts"][key]
        file = directory / entry["file"]
        if not file.is_file():
            raise ExpertFileError(f"{file} is listed in {path} but missing; run `ddlib experts` again to retrain it")
        trajectories.append(_read_expert(file, entry["sha256"])[0])
    accuracies = [index["experts"][k]["test_accuracy"] for k in keys if "test_accuracy" in index["experts"][k]]
    return Experts(directory, index["settings"], trajectories, accuracies)


def experts_folder(root: str | Path, dataset: str, image_size: int, cfg: ExpertConfig) -> Path:
    """``root``/<a name spelling out the settings>: one folder per kind of expert, so notebooks that ask
    for the same experts (07, 09, 10) share the trajectories instead of training them again."""
    kind = cfg.optimizer + ("-curriculum" if cfg.curriculum else "")
    snapshots = f"_{cfg.snapshots_per_epoch}perepoch" if cfg.snapshots_per_epoch > 1 else ""
    return Path(root) / (f"{dataset}_{image_size}px_{cfg.model}_{kind}_{cfg.num_experts}x{cfg.epochs}"
                         f"_subset{cfg.subset}_batch{cfg.batch_size}{snapshots}")


def ensure_experts(real: RealSet, cfg: ExpertConfig, folder: str | Path, *, seed: int = 0,
                   device: str | torch.device = "cpu") -> Experts:
    """Train the experts ``folder`` still lacks, then load them all (each file read and verified once)."""
    if not _complete(real, cfg, Path(folder), seed):
        train_experts(real, cfg, folder, seed=seed, device=device, show_progress=False)
    return load_experts(folder)


def _complete(real: RealSet, cfg: ExpertConfig, folder: Path, seed: int) -> bool:
    """Whether ``folder``'s index already lists ``cfg.num_experts`` experts of these settings, so that
    loading can skip ``train_experts`` (whose check of every file would read each one a second time)."""
    try:
        index = _open_index(folder, _settings(real, cfg, seed))
    except ExpertFileError:
        return False  # train_experts raises the same error
    return all(str(i) in index["experts"] for i in range(cfg.num_experts))
