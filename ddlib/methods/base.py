"""What every distillation method shares: its config fields, the synthetic-set initialisation, and the
iteration loop (progress, history, snapshots, divergence checks, timing).

A method is a ``Distiller`` subclass that implements ``step(iteration)``; ``distill`` runs it.
"""
from __future__ import annotations

import math
import signal
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from ddlib import distributed
from ddlib.augment import DSA, default_strategy
from ddlib.checkpoint import Checkpointer, CheckpointError, Interrupted, StopSignals, check_tensor
from ddlib.data import RealSet
from ddlib.metrics import PeakMemory
from ddlib.models import has_batchnorm
from ddlib.rng import generator
from ddlib.synset import SyntheticSet, class_labels
from ddlib.utils import autocast_context, pass_size, progress

__all__ = ["DistillConfig", "Distiller", "DivergenceError", "INITS", "init_images", "distill_with"]

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
    compile: bool = False            # torch.compile the matching network's passes (dm, datadam only; the
                                     # others need double backward); compiling takes ~0.5-2 min once

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


ClassLoss = Callable[[Tensor, slice], dict[str, Tensor]]


class Distiller:
    """A method's learnable state and one iteration of it.

    Subclasses set ``name`` and ``Config`` and implement ``step(iteration) -> {name: scalar tensor}``,
    drawing every random number from ``self.rng(stream, iteration)`` so that any iteration can be
    replayed from the seed alone.
    """

    name = "base"
    Config = DistillConfig
    # Attributes that change across iterations and go into state_dict(): tensors (copied), optimisers and
    # schedulers (their own state_dict). Subclasses add theirs (e.g. DD: "raw_lrs", "scheduler").
    state_attrs: ClassVar[tuple[str, ...]] = ("images", "labels", "optimizer")
    # Under torchrun, the classes are split across the ranks (the loss is a sum over classes computed through
    # ``owned``/``class_chunks``); other methods run whole on every rank.
    shardable: ClassVar[bool] = False
    # Whether ``cfg.compile`` is supported: only methods whose network passes need no double backward.
    compilable: ClassVar[bool] = False

    def __init__(self, real: RealSet, cfg: DistillConfig, *, seed: int = 0, device: str | torch.device = "cpu"):
        if cfg.compile and not self.compilable:
            raise ValueError(f"{self.name} cannot be compiled: it backpropagates through gradients (double "
                             "backward), which torch.compile does not support; drop --compile (dm and datadam "
                             "accept it)")
        self.cfg, self.seed = cfg, seed
        self.device = torch.device(device)
        self.real = real.to(self.device)
        self.num_classes = real.num_classes
        self.images = init_images(real, cfg.ipc, cfg.init, self.rng("init")).to(self.device).requires_grad_(True)
        self.labels = class_labels(real.num_classes, cfg.ipc, device=self.device)
        self.optimizer = torch.optim.SGD([self.images], lr=cfg.lr_img, momentum=cfg.momentum_img)
        self.dsa = DSA(cfg.dsa_strategy or default_strategy(real.name)) if cfg.dsa else None
        self.autocast = lambda: autocast_context(self.device, cfg.precision)
        self.shard = distributed.class_shard(self.num_classes, self.device) if self.shardable else None
        if not self.shardable and distributed.launch() is not None and distributed.is_main():
            print(f"{self.name} does not shard classes: every rank runs the whole method", flush=True)

    def rng(self, *keys: object) -> torch.Generator:
        """A CPU generator for one random stream of this run (e.g. ``self.rng("net", it)``)."""
        return generator(self.seed, self.name, *keys)

    def step(self, iteration: int) -> dict[str, Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------ class sharding (torchrun)
    @property
    def owned(self) -> slice:
        """The classes this process updates: its block under torchrun, else all of them."""
        return self.shard.classes if self.shard is not None else slice(0, self.num_classes)

    def unshard(self, reason: str) -> None:
        """Compute every class on every rank (e.g. a BatchNorm net's statistics couple all images)."""
        if self.shard is not None and distributed.is_main():
            print(f"{self.name}: no class sharding, {reason}; every rank computes every class", flush=True)
        self.shard = None

    def full_images(self) -> Tensor:
        """Every class's synthetic images, detached (under class sharding: gathered from their owners)."""
        if self.shard is None:
            return self.images.detach()
        return distributed.gather_classes(self.images, self.shard, self.images.shape[0] // self.num_classes)

    def share_images(self) -> None:
        """Copy every class's images from its owner into ``self.images`` (no-op without sharding)."""
        if self.shard is not None:
            with torch.no_grad():
                self.images.copy_(self.full_images())

    def matching_batches(self, batch_real: int, real_rng: torch.Generator,
                         dsa_rng: torch.Generator) -> tuple[Tensor, Tensor]:
        """Real [k, n, C, H, W] and synthetic [k, ipc, C, H, W] images of the ``owned`` classes, through one
        siamese DSA draw per class when DSA is on (drawn for all K classes, so that every rank agrees)."""
        own = self.owned
        real_x = self.real.sample_per_class(batch_real, real_rng)[own]
        syn_x = self.per_class(self.images)[own]
        if self.dsa is not None:
            sharded = dict(classes=own, num_classes=self.num_classes) if self.shard is not None else {}
            real_x, syn_x = self.dsa.siamese(real_x, syn_x, dsa_rng, **sharded)
        return real_x, syn_x

    def stalled(self, record: dict[str, float]) -> str | None:
        """Why the run can no longer learn although its numbers are finite (a method's own check of a logged
        ``record``), or None; ``distill_with`` then warns (RuntimeWarning) at that logging interval."""
        return None

    def log_scalars(self, scalars: dict[str, Tensor]) -> dict[str, Tensor]:
        """The step's scalars over all classes: summed across the ranks under class sharding."""
        return scalars if self.shard is None else distributed.all_reduce_sum(scalars)

    # ------------------------------------------------------------------ state (checkpoints)
    def state_dict(self) -> dict[str, Any]:
        """The learnable state: every ``state_attrs`` entry (tensors as CPU copies, optimisers and schedulers
        by their ``state_dict()``) and ``extra_state()`` under "extra"."""
        state: dict[str, Any] = {}
        for name in self.state_attrs:
            value = getattr(self, name)
            state[name] = value.detach().to("cpu", copy=True) if isinstance(value, Tensor) else value.state_dict()
        state["extra"] = self.extra_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output: tensors are checked (shape, dtype, finite) and copied in place, so
        the optimisers keep pointing at them; then the optimisers and schedulers load theirs."""
        missing = [name for name in (*self.state_attrs, "extra") if name not in state]
        if missing:
            raise CheckpointError(f"the checkpoint lacks {', '.join(missing)} of a {self.name} run")
        tensors = [n for n in self.state_attrs if isinstance(getattr(self, n), Tensor)]
        with torch.no_grad():
            for name in tensors:
                getattr(self, name).copy_(check_tensor(name, state[name], getattr(self, name), "the checkpoint"))
        for name in self.state_attrs:
            if name not in tensors:
                getattr(self, name).load_state_dict(state[name])
        self.load_extra_state(state["extra"])

    def extra_state(self) -> dict[str, Any]:
        """Method state that is neither a tensor attribute nor an optimiser (plain values and tensors)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore ``extra_state()``'s output."""

    def update_images(self, loss: Tensor) -> None:
        """One optimiser step on the synthetic images."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def update_images_by_class(self, syn_x: Tensor, class_loss: ClassLoss, net: torch.nn.Module) -> dict[str, Tensor]:
        """One optimiser step on the images for a loss that is a sum over classes, in class chunks.

        syn_x: [k, ipc, C, H, W], the ``owned`` classes (all K in one process), a differentiable function of
        ``self.images`` (e.g. DSA-augmented); ``class_loss(syn_part, classes)`` gets ``syn_x[classes]``
        (``classes`` counts from the first owned class) and returns scalars, of which ``"loss"``
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
        (one slice on a GPU, where ``chunk_size`` is the whole batch). Under class sharding: those chunks cut
        to the ``owned`` classes, counted from the first owned class."""
        k, own = self.num_classes, self.owned
        if has_batchnorm(net):
            return [slice(0, own.stop - own.start)]
        step = max(1, self.chunk_size(k * per_class) // per_class)
        return [slice(max(start, own.start) - own.start, min(start + step, own.stop) - own.start)
                for start in range(0, k, step) if start < own.stop and start + step > own.start]

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
        return SyntheticSet(self.full_images().clone(), self.labels.clone(), None, meta)


Callback = Callable[[int, Distiller, dict], None]


def distill_with(distiller: Distiller, *, callbacks: tuple[Callback, ...] = (), show_progress: bool = True,
                 checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0,
                 resume: bool = False) -> SyntheticSet:
    """Run ``distiller`` for ``cfg.iterations`` iterations and return its synthetic set.

    Every ``log_every`` iterations the step's scalars are copied to the host once, recorded in the
    history, checked for NaN/inf, and passed to ``callbacks(iteration, distiller, record)``.

    With ``checkpoint_dir``, ``<dir>/checkpoint.pt`` is written every ``checkpoint_every`` iterations (0:
    never on a schedule), at the end, and on SIGINT/SIGTERM (after the current iteration, then
    ``Interrupted`` is raised); ``resume=True`` continues from that file, ending bit-identical on a CPU to
    the run never interrupted.
    """
    cfg = distiller.cfg
    ckpt = Checkpointer(Path(checkpoint_dir), checkpoint_every) if checkpoint_dir is not None else None
    if resume and ckpt is None:
        raise ValueError("resume=True needs checkpoint_dir (the folder holding checkpoint.pt)")
    loop = _restored_loop(ckpt, distiller) if resume else _fresh_loop(distiller)
    start = time.perf_counter() - loop["elapsed"]
    first = loop["iteration"]
    with PeakMemory(distiller.device) as memory, StopSignals(enabled=ckpt is not None) as stop:
        for it in progress(range(first, cfg.iterations), desc=distiller.name, total=cfg.iterations,
                           initial=first, enable=show_progress):
            if cfg.snapshot_every and it % cfg.snapshot_every == 0:
                loop["snapshots"].append([it, distiller.full_images().to("cpu", torch.float16, copy=True)])
            scalars = distiller.step(it)
            loop["iteration"] = it + 1
            if (it + 1) % cfg.log_every == 0 or it + 1 == cfg.iterations:
                record = _checked_record(distiller, scalars, it + 1, loop, ckpt)
                loop["history"]["iteration"].append(it + 1)
                loop["history"]["seconds"].append(time.perf_counter() - start)
                for k, v in record.items():
                    loop["history"].setdefault(k, []).append(v)
                loop["last_good"] = distiller.synthetic_set()
                for callback in callbacks:
                    callback(it + 1, distiller, record)
            if ckpt is not None and (ckpt.due(it + 1) or stop.signum is not None):
                _checked_record(distiller, scalars, it + 1, loop, ckpt)  # never overwrite a good file with NaN
                _save(ckpt, distiller, loop, start)
            if stop.signum is not None:
                raise Interrupted(f"{distiller.name} stopped by {_signame(stop.signum)} after iteration {it + 1} "
                                  f"of {cfg.iterations}; checkpoint written to {ckpt.path}; continue with "
                                  f"--resume {ckpt.directory} (distill_with(..., resume=True))", stop.signum)
        if distiller.device.type == "cuda":
            torch.cuda.synchronize(distiller.device)
    seconds = time.perf_counter() - start
    if ckpt is not None and ckpt.saved_iteration != cfg.iterations:
        _save(ckpt, distiller, loop, start)
    return _final_set(distiller, loop, seconds, memory.peak_bytes)


def _fresh_loop(distiller: Distiller) -> dict[str, Any]:
    """The loop's state before iteration 0 (what a checkpoint stores beside the distiller's state)."""
    return {"iteration": 0, "history": {"iteration": [], "seconds": []}, "snapshots": [],
            "last_good": distiller.synthetic_set(), "elapsed": 0.0}


def _restored_loop(ckpt: Checkpointer, distiller: Distiller) -> dict[str, Any]:
    """Load the checkpoint into ``distiller``; the loop's state as ``_fresh_loop`` makes it."""
    if not ckpt.path.exists():
        raise FileNotFoundError(f"nothing to resume: no checkpoint at {ckpt.path}; run without --resume to start")
    loop = ckpt.load(distiller)
    try:
        loop["last_good"] = SyntheticSet(**loop["last_good"])
        loop["snapshots"] = [[int(i), x] for i, x in loop["snapshots"]]
        loop["elapsed"] = float(loop["elapsed"])
        if not isinstance(loop["history"], dict) or "iteration" not in loop["history"]:
            raise TypeError("history is not a dict of lists")
    except Exception as exc:  # noqa: BLE001 -- whatever a malformed loop record raises
        raise CheckpointError(f"{ckpt.path}: its loop state is malformed ({type(exc).__name__}: {exc}); delete it "
                              "to start afresh") from None
    print(f"resuming {distiller.name} from {ckpt.path} at iteration {loop['iteration']} of "
          f"{distiller.cfg.iterations}", flush=True)
    return loop


def _checked_record(distiller: Distiller, scalars: dict[str, Tensor], iteration: int, loop: dict[str, Any],
                    ckpt: Checkpointer | None) -> dict[str, float]:
    """The step's scalars on the host; DivergenceError (naming the quantity and the last good checkpoint)
    when one of them or the images is NaN or infinite."""
    record = {k: float(v) for k, v in distiller.log_scalars(scalars).items()}  # one host sync per log interval
    bad = [k for k, v in record.items() if not math.isfinite(v)]
    stalled = None if bad else distiller.stalled(record)
    if stalled:  # finite but no longer learning: said loudly, not stopped (tiny test settings get there too)
        warnings.warn(f"{distiller.name} at iteration {iteration}: {stalled}", RuntimeWarning, stacklevel=2)
    if bad or not bool(torch.isfinite(distiller.images).all()):
        what = ", ".join(bad) or "the synthetic images"
        kept = ""
        if ckpt is not None and ckpt.saved_iteration is not None:
            kept = (f"; the last good checkpoint (iteration {ckpt.saved_iteration}) is kept at {ckpt.path}, "
                    f"and the last good set is attached to this error")
        raise DivergenceError(f"{distiller.name} diverged at iteration {iteration}: {what} became NaN or infinite; "
                              f"lower --lr-img (now {distiller.cfg.lr_img}) and check the inputs{kept}",
                              loop["last_good"])
    return record


def _save(ckpt: Checkpointer, distiller: Distiller, loop: dict[str, Any], start: float) -> None:
    last = loop["last_good"]
    state = dict(loop, elapsed=time.perf_counter() - start,
                 last_good={"images": last.images, "labels": last.labels, "lr": last.lr, "meta": last.meta})
    ckpt.save(distiller, state)


def _signame(signum: int) -> str:
    return signal.Signals(signum).name


def _final_set(distiller: Distiller, loop: dict[str, Any], seconds: float, peak_bytes: int) -> SyntheticSet:
    cfg = distiller.cfg
    snapshots = loop["snapshots"]
    if cfg.snapshot_every:
        snapshots.append([cfg.iterations, distiller.full_images().to("cpu", torch.float16, copy=True)])
    synset = distiller.synthetic_set()
    synset.meta.update(iterations=cfg.iterations, history=loop["history"], distill_seconds=seconds,
                       seconds_per_iteration=seconds / max(cfg.iterations, 1), peak_memory_bytes=peak_bytes,
                       device=str(distiller.device))
    if snapshots:
        synset.meta["snapshots"] = {"iterations": [i for i, _ in snapshots],
                                    "images": torch.stack([x for _, x in snapshots])}
    return synset
