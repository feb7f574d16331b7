"""Small shared helpers: devices, pass sizes, progress bars and the description of the machine."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterable, TypeVar

import torch

__all__ = ["resolve_device", "progress", "progress_enabled", "pass_size", "CPU_PASS_IMAGES", "cpu_name",
           "environment", "PRECISION_DTYPES", "autocast_context"]

# Images per network pass on a CPU: the first block's maps of ~32 MNIST/CIFAR images (128 channels,
# 32 x 32) stay in cache, which makes the memory-bound norms, activations and poolings ~1.5-2x faster.
CPU_PASS_IMAGES = 32

T = TypeVar("T")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) picks CUDA when available, else the CPU; anything else is passed to torch."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return device


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device: torch.device, precision: str):
    """Autocast for the network passes ("fp32" disables it). bf16 works on CPUs and GPUs; fp16 on GPUs."""
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; use fp32, bf16 or fp16")
    return torch.autocast(device.type, dtype=PRECISION_DTYPES[precision], enabled=precision != "fp32")


def pass_size(device: torch.device, batch: int, override: int = 0) -> int:
    """Images per network pass over a batch of ``batch``: ``override`` when set, else the whole batch on a
    GPU and ``CPU_PASS_IMAGES`` on a CPU. Callers split only where the result does not depend on it."""
    return override or (batch if device.type == "cuda" else CPU_PASS_IMAGES)


def cpu_name() -> str:
    """The CPU model (platform.processor() is empty on most Linux systems)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """The software and machine a measurement ran on (for metrics.json and benchmark files)."""
    import ddlib

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"ddlib": ddlib.__version__, "commit": commit or None, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "processor": cpu_name(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads()}


def progress_enabled() -> bool:
    """Bars are off under papermill/CI (they flood logs there) or with DDLIB_PROGRESS=0."""
    if os.environ.get("DDLIB_PROGRESS") is not None:
        return os.environ["DDLIB_PROGRESS"] not in ("0", "false", "False", "")
    return not (os.environ.get("CI") or os.environ.get("PAPERMILL_EXECUTION") or os.environ.get("PYTEST_CURRENT_TEST"))


def progress(iterable: Iterable[T], *, desc: str = "", total: int | None = None, enable: bool = True,
             **kwargs) -> Iterable[T]:
    """A tqdm bar (notebook-aware) that updates at most twice a second, or the bare iterable."""
    if not (enable and progress_enabled()):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, mininterval=0.5, dynamic_ncols=True, **kwargs)
