"""Scale-out inside one run, launched by ``torchrun``: class sharding for distillation, experts split by rank.

``torchrun --nproc-per-node N -m ddlib distill ...`` starts N processes with RANK, WORLD_SIZE and LOCAL_RANK
in their environment. Each rank owns a contiguous block of classes (``class_blocks``), builds the same random
network from the iteration's seed, and updates only its classes' synthetic images; ``gather_classes`` puts
the full set together where it is needed (at log intervals and the end; DC also before each inner training).

A single process (no RANK/WORLD_SIZE, or a world of one) never imports ``torch.distributed``: every helper
here is then a no-op. The process group uses gloo on a CPU and nccl on CUDA devices.
"""
from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
from torch import Tensor

__all__ = ["Launch", "ClassShard", "launch", "rank", "is_main", "init", "device_for", "class_blocks",
           "class_shard", "gather_classes", "all_reduce_sum", "owned_items", "gather_objects", "barrier",
           "prefix_output", "finish"]

T = TypeVar("T")


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a torchrun launch."""

    rank: int         # global rank (RANK)
    world_size: int   # processes in the run (WORLD_SIZE)
    local_rank: int   # rank on this machine (LOCAL_RANK): picks the GPU


def launch() -> Launch | None:
    """This process's torchrun launch, from the environment; None for a single process or a world of one."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        rank_ = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank_))
    except (KeyError, ValueError) as exc:
        raise RuntimeError(f"WORLD_SIZE is set but RANK/LOCAL_RANK are missing or malformed ({exc}); "
                           "launch with torchrun") from None
    return Launch(rank_, world, local)


def rank() -> int:
    """This process's global rank (0 for a single process)."""
    run = launch()
    return run.rank if run else 0


def is_main() -> bool:
    """Whether this process writes files (rank 0, or a single process)."""
    return rank() == 0


def device_for(device: torch.device) -> torch.device:
    """Under torchrun, a bare CUDA device becomes this rank's GPU (``cuda:LOCAL_RANK``)."""
    run = launch()
    if run is None or device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", run.local_rank % max(1, torch.cuda.device_count()))


def init(device: torch.device | str = "cpu") -> Launch | None:
    """Join the default process group once (gloo on a CPU, nccl on CUDA); None without a launch."""
    run = launch()
    if run is None:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device_for(device))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(finish)  # one group for the whole process (a script may run several commands)
    return run


def finish() -> None:
    """Leave the process group (when one was joined)."""
    if launch() is None:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if launch() is None:
        return
    import torch.distributed as dist

    dist.barrier()


# ------------------------------------------------------------------------------------------ classes
def class_blocks(num_classes: int, world_size: int) -> list[slice]:
    """Contiguous class blocks, one per rank; the first ``num_classes % world_size`` ranks get one more."""
    if world_size > num_classes:
        raise ValueError(f"{world_size} processes for {num_classes} classes: class sharding needs at most one "
                         f"process per class; use --nproc-per-node <= {num_classes}")
    base, extra = divmod(num_classes, world_size)
    starts = [r * base + min(r, extra) for r in range(world_size + 1)]
    return [slice(starts[r], starts[r + 1]) for r in range(world_size)]


@dataclass(frozen=True)
class ClassShard:
    """The class blocks of a sharded run and this rank's place in it."""

    launch: Launch       # rank and world size
    blocks: tuple        # one slice of classes per rank

    @property
    def classes(self) -> slice:
        """The classes this rank owns."""
        return self.blocks[self.launch.rank]


def class_shard(num_classes: int, device: torch.device | str = "cpu") -> ClassShard | None:
    """This rank's share of ``num_classes`` classes (joining the process group); None for a single process."""
    run = init(device)
    if run is None:
        return None
    return ClassShard(run, tuple(class_blocks(num_classes, run.world_size)))


def gather_classes(x: Tensor, shard: ClassShard | None, per_class: int) -> Tensor:
    """The full [K * per_class, ...] tensor, each class block's rows taken from its owner (a copy).

    Blocks may differ by one class, so every rank sends its rows padded to the largest block.
    """
    if shard is None:
        return x.detach().clone()
    import torch.distributed as dist

    rows = [(b.start * per_class, b.stop * per_class) for b in shard.blocks]
    size = max(hi - lo for lo, hi in rows)
    lo, hi = rows[shard.launch.rank]
    mine = x.detach().new_zeros((size, *x.shape[1:]))
    mine[:hi - lo] = x.detach()[lo:hi]
    parts = [torch.empty_like(mine) for _ in rows]
    dist.all_gather(parts, mine.contiguous())
    return torch.cat([part[:hi - lo] for part, (lo, hi) in zip(parts, rows)])


def all_reduce_sum(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Scalars summed over the ranks in one collective (unchanged for a single process)."""
    if launch() is None or not values:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[k]).detach().float().reshape(()) for k in keys])
    dist.all_reduce(stacked)
    return dict(zip(keys, stacked.unbind()))


# ------------------------------------------------------------------------------------------ items
def owned_items(items: Sequence[T], run: Launch | None = None) -> list[T]:
    """This rank's share of ``items``, round-robin (``items[rank::world]``); all of them for one process."""
    run = run if run is not None else launch()
    return list(items) if run is None else list(items[run.rank::run.world_size])


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` for a single process."""
    run = launch()
    if run is None:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * run.world_size
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------------------ logs
class _Prefixed:
    """A text stream that starts every line with a prefix (for the ranks' interleaved logs)."""

    def __init__(self, stream, prefix: str):
        self._stream, self._prefix, self._fresh = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            if self._fresh:
                out.append(self._prefix)
            out.append(piece)
            self._fresh = piece.endswith("\n")
        self._stream.write("".join(out))
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def prefix_output() -> None:
    """Under torchrun, prefix stdout and stderr lines with ``[rank R/N]``."""
    run = launch()
    if run is None or isinstance(sys.stdout, _Prefixed):
        return
    prefix = f"[rank {run.rank}/{run.world_size}] "
    sys.stdout, sys.stderr = _Prefixed(sys.stdout, prefix), _Prefixed(sys.stderr, prefix)
