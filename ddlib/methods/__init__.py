"""Distillation methods (a registry of ``Distiller`` classes) and the coreset baselines.

    synset = distill("dm", real, ipc=10, iterations=200, seed=0)
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

from ddlib.data import RealSet
from ddlib.methods import datadam, datm, dc, dd, dm, mtt, pad  # noqa: F401  (registers every method)
from ddlib.methods.base import DistillConfig, Distiller, DivergenceError, distill_with
from ddlib.methods.registry import get_method, list_methods, register_method
from ddlib.synset import SyntheticSet
from ddlib.utils import resolve_device

__all__ = ["distill", "make_config", "get_method", "list_methods", "register_method", "DistillConfig",
           "Distiller", "DivergenceError"]


def make_config(method: str, preset: str | None = None, **overrides: Any) -> DistillConfig:
    """``method``'s config: its defaults, then the named ``preset``, then ``overrides`` (None is ignored).

    Unknown fields raise a ValueError that lists the method's fields.
    """
    cls = get_method(method)
    values: dict[str, Any] = {}
    presets = getattr(cls, "PRESETS", {})
    if preset is not None:
        if preset not in presets:
            raise ValueError(f"{method} has no preset {preset!r}; presets: {', '.join(sorted(presets)) or 'none'}")
        values.update(presets[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in fields(cls.Config)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{method} has no setting {', '.join(unknown)}; its settings: {', '.join(sorted(names))}")
    return cls.Config(**values)


def distill(method: str, real: RealSet, cfg: DistillConfig | None = None, *, seed: int = 0,
            device: str | torch.device = "auto", callbacks: tuple = (), show_progress: bool = True,
            preset: str | None = None, checkpoint_dir: str | None = None, checkpoint_every: int = 0,
            resume: bool = False, **overrides: Any) -> SyntheticSet:
    """Distil ``real`` with ``method`` and return the synthetic set (its meta records everything).

    checkpoint_dir/checkpoint_every/resume: see ``distill_with`` (checkpoints and exact resume)."""
    cfg = cfg or make_config(method, preset, **overrides)
    distiller = get_method(method)(real, cfg, seed=seed, device=resolve_device(device))
    return distill_with(distiller, callbacks=callbacks, show_progress=show_progress, checkpoint_dir=checkpoint_dir,
                        checkpoint_every=checkpoint_every, resume=resume)
