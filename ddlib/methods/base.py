"""What every distillation method shares: its config fields, the synthetic-set initialisation, and the
iteration loop (progress, history, snapshots, divergence checks, timing).

A method is a ``Distiller`` subclass that implements ``step(iteration)``; ``distill`` runs it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import torch
from torch import Tensor

from ddlib.augment import DSA, default_strategy
from ddlib.data import RealSet
from ddlib.metrics import PeakMemory
from ddlib.models import has_batchnorm
from ddlib.rng import generator
from ddlib.synset import SyntheticSet, class_labels
from ddlib.utils import pass_size, progress

__all__ = ["DistillConfig", "Distiller", "DivergenceError", "INITS", "init_images", "distill_with",
           "autocast_context"]

INITS = ("real", "noise", "uniform", "white", "black", "grey")


@dataclass
class DistillConfig:
    """Settings every distillation method shares (a method's config subclasses this)."""

    ipc: int = 10                    # synthetic images per class
    iterations: int = 1000           # outer iterations (each draws a fresh network)
    model: str = "convnet"           # the network used for matching
    lr_img: float = 1.0              # SGD learning rate of the synthetic images
    momentum_img: float = 0.5        # SGD momentum of the images (0.5 in every official method)
    batch_real: int = 256            # real images per class per iteration
    init: str = "real"               # real | noise | uniform | white | black | grey
    dsa: bool = True                 # differentiable siamese augmentation inside the matching
    dsa_strategy: str = ""           # "" = the dataset's default (no flip for digit datasets)
    precision: str = "fp32"          # fp32 | bf16 | fp16: autocast for the network passes; images stay fp32
    log_every: int = 10              # iterations between history records (the loss reaches the host only then)
    snapshot_every: int = 0          # iterations between saved copies of the images (0: none)
    chunk: int = 0                   # images per network pass (0: ~32 on a CPU, where cache-sized passes run
                                     # 2x faster; everything at once on a GPU). Results do not depend on it.

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite; the last good synthetic set is attached as ``.last_good``."""

    def __init__(self, message: str, last_good: SyntheticSet | None = None):
        super().__init__(message)
        self.last_good = last_good


def init_images(real: RealSet, images_per_class: int, init: str, rng: torch.Generator) -> Tensor:
    """Initial synthetic images [K * ipc, C, H, W], ordered by class, in the dataset's normalised space.

    real: randomly chosen real images of each class; noise: N(0, 1) in normalised space (the official
    DC default); uniform: U(0, 1) pixels; white/black/grey: constant pixels 1, 0 and 0.5.
    """
    k, c, s = real.num_classes, real.channels, real.image_size
    shape = (k * images_per_class, c, s, s)
    if init == "real":
        counts = real.class_counts
        smallest = int(counts.min())
        if images_per_class > smallest:
            cls = int(counts.argmin())
            raise ValueError(f"--ipc {images_per_class} is larger than class {real.class_names[cls]!r} of "
                             f"{real.name}, which has {smallest} training images; use --ipc <= {smallest}")
        return torch.cat([real.sample(cls, images_per_class, rng).cpu() for cls in range(k)]).float()
    if init == "noise":
        return torch.randn(shape, generator=rng)
    pixels = {"uniform": None, "white": 1.0, "black": 0.0, "grey": 0.5}
    if init not in pixels:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    value = pixels[init]
    x = torch.rand(shape, generator=rng) if value is None else torch.full(shape, value)
    return real.normalise(x)


def autocast_context(device: torch.device, precision: str):
    """Autocast for the network passes ("fp32" disables it). bf16 works on CPUs and GPUs; fp16 on GPUs."""
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"unknown precision {precision!r}; use fp32, bf16 or fp16")
    dtype = dtypes[precision]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


ClassLoss = Callable[[Tensor, slice], dict[str, Tensor]]


class Distiller:
    """A method's learnable state and one iteration of it.

    Subclasses set ``name`` and ``Config`` and implement ``step(iteration) -> {name: scalar tensor}``,
    drawing every random number from ``self.rng(stream, iteration)`` so that any iteration can be
    replayed from the seed alone.
    """

    name = "base"
    Config = DistillConfig

    def __init__(self, real: RealSet, cfg: DistillConfig, *, seed: int = 0, device: str | torch.device = "cpu"):
        self.cfg, self.seed = cfg, seed
        self.device = torch.device(device)
        self.real = real.to(self.device)
        self.num_classes = real.num_classes
        self.images = init_images(real, cfg.ipc, cfg.init, self.rng("init")).to(self.device).requires_grad_(True)
        self.labels = class_labels(real.num_classes, cfg.ipc, device=self.device)
        self.optimizer = torch.optim.SGD([self.images], lr=cfg.lr_img, momentum=cfg.momentum_img)
        self.dsa = DSA(cfg.dsa_strategy or default_strategy(real.name)) if cfg.dsa else None
        self.autocast = lambda: autocast_context(self.device, cfg.precision)

    def rng(self, *keys: object) -> torch.Generator:
        """A CPU generator for one random stream of this run (e.g. ``self.rng("net", it)``)."""
        return generator(self.seed, self.name, *keys)

    def step(self, iteration: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def update_images(self, loss: Tensor) -> None:
        """One optimiser step on the synthetic images."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def update_images_by_class(self, syn_x: Tensor, class_loss: ClassLoss, net: torch.nn.Module) -> dict[str, Tensor]:
        """One optimiser step on the images for a loss that is a sum over classes, in class chunks.

        syn_x: [K, ipc, C, H, W], a differentiable function of ``self.images`` (e.g. DSA-augmented);
        ``class_loss(syn_part, classes)`` gets ``syn_x[classes]`` and returns scalars, of which ``"loss"``
        is backpropagated; the returned scalars are summed over the chunks. Each chunk's backward runs at
        once (its maps stay in cache on a CPU); the gradients meet at a detached copy of ``syn_x`` and go
        through the augmentation to the images once. Nets with BatchNorm, whose statistics couple all
        images, and GPUs get a single chunk.
        """
        leaf = syn_x.detach().requires_grad_(True)
        totals: dict[str, Tensor] = {}
        for classes in self.class_chunks(net, syn_x.shape[1]):
            with self.autocast():
                parts = class_loss(leaf[classes], classes)
            parts["loss"].backward()
            for key, value in parts.items():
                totals[key] = totals[key] + value.detach() if key in totals else value.detach()
        self.optimizer.zero_grad(set_to_none=True)
        syn_x.backward(leaf.grad)
        self.optimizer.step()
        return totals

    def class_chunks(self, net: torch.nn.Module, per_class: int) -> list[slice]:
        """Slices over the K classes, each holding about ``chunk_size`` images of ``per_class`` per class
        (one slice on a GPU, where ``chunk_size`` is the whole batch)."""
        k = self.num_classes
        if has_batchnorm(net):
            return [slice(0, k)]
        step = max(1, self.chunk_size(k * per_class) // per_class)
        return [slice(start, min(start + step, k)) for start in range(0, k, step)]

    def chunk_size(self, batch: int) -> int:
        """Images per network pass over a batch of ``batch`` (``cfg.chunk``, else ``utils.pass_size``)."""
        return pass_size(self.device, batch, self.cfg.chunk)

    @torch.no_grad()
    def embed_real(self, net: torch.nn.Module, x: Tensor) -> Tensor:
        """``net.embed(x)`` without gradients, [B, ...] -> [B, D], in chunks of ``chunk_size`` images.

        BatchNorm networks see the whole batch at once, since their statistics depend on it.
        """
        chunk = self.chunk_size(x.shape[0])
        if has_batchnorm(net) or chunk >= x.shape[0]:
            return net.embed(x)
        return torch.cat([net.embed(part) for part in x.split(chunk)])

    def per_class(self, x: Tensor) -> Tensor:
        """[K * ipc, ...] ordered by class -> [K, ipc, ...]."""
        return x.view(self.num_classes, -1, *x.shape[1:])

    def synthetic_set(self) -> SyntheticSet:
        meta = {"dataset": self.real.meta(), "method": self.name, "config": self.cfg.to_dict(), "seed": self.seed}
        if self.real.zca is not None:
            meta["zca_state"] = self.real.zca
        return SyntheticSet(self.images.detach().clone(), self.labels.clone(), None, meta)


Callback = Callable[[int, Distiller, dict], None]


def distill_with(distiller: Distiller, *, callbacks: tuple[Callback, ...] = (),
                 show_progress: bool = True) -> SyntheticSet:
    """Run ``distiller`` for ``cfg.iterations`` iterations and return its synthetic set.

    Every ``log_every`` iterations the step's scalars are copied to the host once, recorded in the
    history, checked for NaN/inf, and passed to ``callbacks(iteration, distiller, record)``.
    """
    cfg = distiller.cfg
    history: dict[str, list] = {"iteration": [], "seconds": []}
    snapshots: list[tuple[int, Tensor]] = []
    last_good = distiller.synthetic_set()
    start = time.perf_counter()
    with PeakMemory(distiller.device) as memory:
        for it in progress(range(cfg.iterations), desc=distiller.name, total=cfg.iterations, enable=show_progress):
            if cfg.snapshot_every and it % cfg.snapshot_every == 0:
                snapshots.append((it, distiller.images.detach().to("cpu", torch.float16, copy=True)))
            scalars = distiller.step(it)
            if (it + 1) % cfg.log_every == 0 or it + 1 == cfg.iterations:
                record = {k: float(v) for k, v in scalars.items()}  # the one host sync per log interval
                bad = [k for k, v in record.items() if not math.isfinite(v)]
                if bad or not bool(torch.isfinite(distiller.images).all()):
                    what = ", ".join(bad) or "the synthetic images"
                    raise DivergenceError(f"{distiller.name} diverged at iteration {it + 1}: {what} became NaN or "
                                          f"infinite; lower --lr-img (now {cfg.lr_img}) and check the inputs",
                                          last_good)
                history["iteration"].append(it + 1)
                history["seconds"].append(time.perf_counter() - start)
                for k, v in record.items():
                    history.setdefault(k, []).append(v)
                last_good = distiller.synthetic_set()
                for callback in callbacks:
                    callback(it + 1, distiller, record)
        if distiller.device.type == "cuda":
            torch.cuda.synchronize(distiller.device)
    seconds = time.perf_counter() - start
    if cfg.snapshot_every:
        snapshots.append((cfg.iterations, distiller.images.detach().to("cpu", torch.float16, copy=True)))
    synset = distiller.synthetic_set()
    synset.meta.update(iterations=cfg.iterations, history=history, distill_seconds=seconds,
                       seconds_per_iteration=seconds / max(cfg.iterations, 1), peak_memory_bytes=memory.peak_bytes,
                       device=str(distiller.device))
    if snapshots:
        synset.meta["snapshots"] = {"iterations": [i for i, _ in snapshots],
                                    "images": torch.stack([x for _, x in snapshots])}
    return synset
