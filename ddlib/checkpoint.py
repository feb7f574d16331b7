"""Long runs: checkpoints of a distillation run, the signals that write one, and the lock on an output folder.

A checkpoint (``<dir>/checkpoint.pt``, written atomically with a sha256 of its contents) holds a
Distiller's ``state_dict()`` (images, labels, learned rates and soft labels, every optimiser and
scheduler) and the loop's state (iterations done, history, snapshots, the last good set, seconds
spent), with the method, seed, config and a fingerprint of the dataset it was made from. Every random
draw of an iteration comes from ``generator(seed, method, stream, iteration)``, so no generator state
needs saving: a run resumed from a checkpoint ends bit-identical (on a CPU) to one never interrupted.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ddlib.io import load_checked, save_checked

__all__ = ["CheckpointError", "Interrupted", "Checkpointer", "StopSignals", "RunLock", "RunLockedError",
           "checkpoint_path", "dataset_fingerprint", "check_tensor", "with_new_defaults", "CHECKPOINT_NAME",
           "FORMAT"]

FORMAT = "ddlib.Checkpoint"
CHECKPOINT_NAME = "checkpoint.pt"
LOCK_NAME = ".lock"
# Config fields a resumed run may change: they do not change the synthetic set.
FREE_ON_RESUME = ("iterations", "chunk", "log_every", "snapshot_every")


class CheckpointError(ValueError):
    """A checkpoint that is corrupt, truncated, from another run, or holds tensors of the wrong shape."""


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped a run after it wrote a checkpoint; ``str()`` says how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def checkpoint_path(path: str | os.PathLike) -> Path:
    """The checkpoint file of a run folder (``<dir>/checkpoint.pt``), or ``path`` itself when it is a file."""
    path = Path(path)
    return path if path.suffix == ".pt" else path / CHECKPOINT_NAME


def dataset_fingerprint(real: Any, samples: int = 512) -> str:
    """sha256 of a RealSet's shapes, labels and ~``samples`` evenly spaced train and test images: cheap,
    and different when the dataset root, size or files change between a run and its resume."""
    h = hashlib.sha256()
    for images, labels in ((real.train_images, real.train_labels), (real.test_images, real.test_labels)):
        step = max(1, images.shape[0] // samples)
        h.update(f"{tuple(images.shape)}{images.dtype}".encode())
        h.update(labels.detach().cpu().to(torch.int64).numpy().tobytes())
        h.update(images[::step].detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_tensor(name: str, saved: Any, current: Tensor, where: str) -> Tensor:
    """``saved`` if it is a finite tensor of ``current``'s shape and dtype; CheckpointError otherwise."""
    if not isinstance(saved, Tensor):
        raise CheckpointError(f"{where}: {name} is {type(saved).__name__}, not a tensor")
    if saved.shape != current.shape or saved.dtype != current.dtype:
        raise CheckpointError(f"{where}: {name} is {saved.dtype} {tuple(saved.shape)} but this run has "
                              f"{current.dtype} {tuple(current.shape)}; resume with the settings it was made with")
    if saved.is_floating_point() and not bool(torch.isfinite(saved).all()):
        raise CheckpointError(f"{where}: {name} holds NaN or infinite values")
    return saved


@dataclass
class Checkpointer:
    """Writes and reads the checkpoint of one run.

    ``distiller`` is duck-typed: ``name``, ``seed``, ``cfg`` (with ``to_dict()``), ``real`` and
    ``state_dict()`` / ``load_state_dict()``.
    """

    directory: Path                  # run folder; the file is <directory>/checkpoint.pt
    every: int = 0                   # iterations between checkpoints (0: only on SIGINT/SIGTERM and at the end)
    saved_iteration: int | None = field(default=None, init=False)  # iteration of the last checkpoint written

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        if self.every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0, got {self.every}")

    @property
    def path(self) -> Path:
        return checkpoint_path(self.directory)

    def due(self, iteration: int) -> bool:
        """Whether a checkpoint is due after ``iteration`` iterations."""
        return bool(self.every) and iteration % self.every == 0

    def save(self, distiller: Any, loop: dict[str, Any]) -> Path:
        """Write the run's state after ``loop["iteration"]`` iterations (atomically: a crash keeps the old file)."""
        payload = {"method": distiller.name, "seed": distiller.seed, "config": distiller.cfg.to_dict(),
                   "device": distiller.device.type, "dataset": distiller.real.meta(),
                   "fingerprint": dataset_fingerprint(distiller.real),
                   "torch": torch.__version__, "written": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "state": distiller.state_dict(), "loop": loop}
        save_checked(payload, self.path, FORMAT)
        self.saved_iteration = int(loop["iteration"])
        return self.path

    def load(self, distiller: Any) -> dict[str, Any]:
        """Restore ``distiller`` from the checkpoint after checking it was made by the same run; returns the
        loop state."""
        hint = "delete it to start afresh, or resume from another copy"
        body = load_checked(self.path, FORMAT, CheckpointError, hint)
        self._check_same_run(body, distiller)
        try:
            distiller.load_state_dict(body["state"])
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise CheckpointError(f"{self.path} does not fit this run ({type(exc).__name__}: {exc}); {hint}") from None
        loop = body["loop"]
        if not 0 <= int(loop["iteration"]) <= distiller.cfg.iterations:
            raise CheckpointError(f"{self.path} is at iteration {loop['iteration']}, past --iterations "
                                  f"{distiller.cfg.iterations}; raise --iterations to continue it")
        self.saved_iteration = int(loop["iteration"])
        return loop

    def _check_same_run(self, body: dict[str, Any], distiller: Any) -> None:
        where = f"the checkpoint {self.path}"
        if body.get("method") != distiller.name or body.get("seed") != distiller.seed:
            raise CheckpointError(f"{where} is from a {body.get('method')} run with seed {body.get('seed')}, not "
                                  f"{distiller.name} with seed {distiller.seed}; pass --method "
                                  f"{body.get('method')} --seed {body.get('seed')}")
        saved, now = with_new_defaults(body.get("config", {}), distiller.cfg), distiller.cfg.to_dict()
        changed = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
                   if k not in FREE_ON_RESUME and saved.get(k) != now.get(k)]
        if changed:
            raise CheckpointError(f"{where} was made with other settings ({'; '.join(changed)}); resume with the "
                                  f"original settings (only {', '.join(FREE_ON_RESUME)} may change)")
        if body.get("dataset") != distiller.real.meta():
            raise CheckpointError(f"{where} was made from {json.dumps(body.get('dataset'))}, but this run loads "
                                  f"{json.dumps(distiller.real.meta())}; pass the same --dataset and --image-size")
        if body.get("fingerprint") != dataset_fingerprint(distiller.real):
            raise CheckpointError(f"{where} was made from other images of {distiller.real.name} (has the data "
                                  "root or its files changed?); point --data-root at the data it was made from")


def with_new_defaults(saved: dict[str, Any], config: Any) -> dict[str, Any]:
    """A checkpoint's ``saved`` config plus the default of every field of ``config`` (a config dataclass or
    one of its instances) that it lacks: a checkpoint written before a field was added to the method's
    config ran with that field's default, so resuming it with the default is the same run."""
    missing = {f.name: f.default for f in fields(config) if f.name not in saved and f.default is not MISSING}
    return {**saved, **missing}


class StopSignals:
    """While active, SIGINT and SIGTERM set ``signum`` instead of killing the run, so the loop can finish
    its iteration, write a checkpoint and stop; a second signal stops at once. The previous handlers come
    back on exit. Outside the main thread (where handlers cannot be set) it does nothing."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # the second signal: stop now, without a checkpoint
            raise KeyboardInterrupt(f"stopped by a second {signal.Signals(signum).name} before the checkpoint")
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this iteration, then writing a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class RunLockedError(FileExistsError):
    """Another live process holds the output folder's lock."""


class RunLock:
    """An output folder's lock file (``<dir>/.lock``: pid, host, start time, command line).

    A second run on the same folder is refused while the first lives; a lock left by a process that is
    gone (same host) is taken over with a message; ``force`` takes any lock over.
    """

    def __init__(self, directory: str | os.PathLike, force: bool = False):
        self.path = Path(directory) / LOCK_NAME
        self.force = force

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)}
        while not self._create(record):
            holder = self._holder()
            if holder is None:
                continue  # removed meanwhile, or unreadable and removed: try again
            alive = _alive(holder)
            if alive and not self.force:
                raise RunLockedError(f"{self.path.parent} is in use by process {holder.get('pid')} on "
                                     f"{holder.get('host')} (since {holder.get('started')}; lock file {self.path}); "
                                     "wait for it, choose another --out, or pass --force if it is not running")
            why = "--force" if alive else f"process {holder.get('pid')} is no longer running"
            print(f"taking over the lock {self.path} ({why})", file=sys.stderr)
            self.path.unlink(missing_ok=True)
        return self

    def _create(self, record: dict) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record) + "\n")
        return True

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            holder = {}
        return holder if isinstance(holder, dict) else {}

    def __exit__(self, *exc: Any) -> None:
        holder = self._holder()
        if holder is not None and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)


def _alive(holder: dict) -> bool:
    """Whether the lock's process still runs (another host's process counts as alive: it cannot be checked)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
