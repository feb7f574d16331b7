"""Tiny datasets in the real on-disk formats, generated deterministically (no real data in tests).

``make_data_root(path)`` writes ``MNIST/raw`` (IDX, 20 train / 10 test images per class... see below)
and ``mhist/`` (CRLF annotations.csv + PNGs) under ``path``; the notebook tests point DDLIB_DATA at it.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

MHIST_HEADER = ["Image Name", "Majority Vote Label", "Number of Annotators who Selected SSA (Out of 7)", "Partition"]


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uint8 IDX file (MNIST's format: magic 0x0800 | ndim, big-endian dims, bytes), gzipped for .gz."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def make_mnist(root: Path, train_per_class: int = 20, test_per_class: int = 5, seed: int = 0) -> Path:
    """``root/MNIST/raw`` with digit-like 28x28 images: class c draws a bright bar at row 2c+4."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.repeat(np.arange(10), per_class)
        images = rng.integers(0, 40, size=(labels.size, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c + 4: 2 * c + 7, 4:24] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return raw


def make_mhist(root: Path, size: int = 32, per_split: dict | None = None, seed: int = 0) -> Path:
    """``root/mhist`` with a CRLF annotations.csv and RGB PNGs; HP images reddish, SSA bluish."""
    per_split = per_split or {("train", "HP"): 12, ("train", "SSA"): 6, ("test", "HP"): 6, ("test", "SSA"): 4}
    rng = np.random.default_rng(seed)
    folder = Path(root) / "mhist"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows, index = [MHIST_HEADER], 0
    for (partition, label), count in per_split.items():
        for _ in range(count):
            name = f"MHIST_{index:03d}.png"
            base = np.array([200, 90, 120] if label == "HP" else [110, 100, 210])
            pixels = np.clip(base + rng.normal(0, 25, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / "images" / name)
            votes = int(rng.integers(0, 4)) if label == "HP" else int(rng.integers(4, 8))
            rows.append([name, label, str(votes), partition])
            index += 1
    (folder / "annotations.csv").write_bytes(("\r\n".join(",".join(r) for r in rows) + "\r\n").encode())
    return folder


def make_data_root(root: Path) -> Path:
    """A data root holding tiny MNIST and MHIST fixtures (digits needs none)."""
    make_mnist(root)
    make_mhist(root)
    return Path(root)
