"""Seeds and random generators.

Every random draw in ddlib takes an explicit ``torch.Generator`` derived from the run's seed and a
few keys naming the stream (``"net", iteration``), so a run never reads the clock, never reseeds the
global RNG, and any iteration's draws can be recreated on their own (which is what makes resuming
exact).
"""
from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import torch

__all__ = ["derive_seed", "generator", "seed_everything"]


def derive_seed(seed: int, *keys: object) -> int:
    """A stable 63-bit seed from ``seed`` and ``keys`` (same inputs, same output, on every machine)."""
    text = repr((int(seed),) + tuple(keys)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def generator(seed: int, *keys: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with ``derive_seed(seed, *keys)``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *keys))
    return g


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch's global RNGs once, for notebook code outside ddlib.

    ddlib itself never uses the global RNGs; this is for the user's own cells (e.g. a plot's jitter).
    ``deterministic=True`` also asks torch for deterministic kernels (slower on GPU).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
