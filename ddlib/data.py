"""Real datasets as whole tensors: ``load_dataset(name, root, image_size) -> RealSet``.

Every loader stacks the full train and test splits into ``[N, C, H, W]`` float32 tensors, normalised with a
per-channel mean/std (or ZCA-whitened), the way the dataset-distillation papers do: no augmentation inside the
dataset, and a per-class index for drawing real images by class.

Data never lives in git. The data root is ``root=``, else ``$DDLIB_DATA``, else ``./data``; ``data/README.md``
says how to obtain each dataset and where its files go.

Datasets: ``digits`` (scikit-learn's 8x8 digits, offline, the default for tests), ``mnist``, ``mhist``,
``cifar10`` and ``imagefolder`` (``PATH/{train,test}/<class>/*.png``). Add one with ``@register_dataset``.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import os
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ddlib.io import atomic_write, checksum, load_tensors, save_tensors

__all__ = [
    "DatasetFormatError",
    "DatasetNotFoundError",
    "RealSet",
    "denormalise",
    "from_tensors",
    "list_datasets",
    "load_dataset",
    "prepare_mhist",
    "register_dataset",
    "resolve_data_root",
]

README_HINT = "See data/README.md in the ddlib repository for where to get it and the expected layout."
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
ZCA_EPS = 0.1  # kornia's ZCAWhitening eps as used by MTT/DATM/PAD
ZCA_MAX_FEATURES = 4096  # C*H*W; the covariance is features^2 floats (4096^2 * 4 B = 64 MiB)
MHIST_COLUMNS = (
    "Image Name",
    "Majority Vote Label",
    "Number of Annotators who Selected SSA (Out of 7)",
    "Partition",
)
MHIST_CLASSES = ("HP", "SSA")
MHIST_DIRS = ("mhist", "MHIST", "mhist224", "mhist128")
MHIST_CACHE_VERSION = 1
OFFICIAL_MD5 = {
    "annotations.csv": "4f4a2c2b621c4caa16635273c9b383f5",
    "images.zip": "486973abb3cf7985df2034701d81e9c1",
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where the loader looked; the message lists the paths and how to get them."""


class DatasetFormatError(ValueError):
    """A dataset's files are there but malformed; the message names the problem and the fix."""


# --------------------------------------------------------------------------------------------- RealSet


@dataclass(eq=False, repr=False)
class RealSet:
    """A real dataset held as tensors, normalised, with a per-class index for class-wise sampling.

    Images are ``[N, C, H, W]`` float32 (normalised with ``mean``/``std``, or ZCA-whitened when ``zca``
    holds a state), labels ``[N]`` int64 in ``[0, num_classes)``. The class index always lives on the CPU so
    that the same generator draws the same images on every device.
    """

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    zca: dict | None = None
    info: dict = field(default_factory=dict)
    _counts: Tensor = field(init=False, repr=False)
    _index: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.mean, self.std = tuple(map(float, self.mean)), tuple(map(float, self.std))
        self.class_names = [str(c) for c in self.class_names]
        _check_split(self.train_images, self.train_labels, self.num_classes, "train")
        _check_split(self.test_images, self.test_labels, self.num_classes, "test")
        if self.test_images.shape[1:] != self.train_images.shape[1:]:
            raise ValueError(
                f"train images {tuple(self.train_images.shape[1:])} and test images "
                f"{tuple(self.test_images.shape[1:])} differ in shape"
            )
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean/std need {self.channels} values (one per channel), got {self.mean}/{self.std}"
            )
        self._counts, self._index = _class_index(self.train_labels.cpu(), self.num_classes)

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.train_images.shape[1:]))
        return (
            f"RealSet({self.name!r}, train={len(self.train_labels)}, test={len(self.test_labels)}, "
            f"image={shape}, classes={self.num_classes}, zca={self.zca is not None}, "
            f"device={self.train_images.device})"
        )

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train(self) -> tuple[Tensor, Tensor]:
        return self.train_images, self.train_labels

    @property
    def test(self) -> tuple[Tensor, Tensor]:
        return self.test_images, self.test_labels

    @property
    def class_counts(self) -> Tensor:
        """Train images per class, ``[K]`` int64 on the CPU."""
        return self._counts.clone()

    def sample(self, c: int, n: int, generator: torch.Generator) -> Tensor:
        """``n`` distinct train images of class ``c``, ``[n, C, H, W]``, in a random order."""
        _check_cpu_generator(generator)
        if not 0 <= c < self.num_classes:
            raise ValueError(f"class {c} is out of range: {self.name} has {self.num_classes} classes")
        count = int(self._counts[c])
        if not 0 <= n <= count:
            raise ValueError(
                f"cannot draw {n} images of class {c} ({self.class_names[c]!r}) without replacement: "
                f"{self.name} has {count} training images of that class"
            )
        picks = self._index[c, torch.randperm(count, generator=generator)[:n]]
        return self.train_images[picks.to(self.train_images.device)]

    def sample_per_class(self, n: int, generator: torch.Generator) -> Tensor:
        """``n'`` distinct train images of every class, ``[K, n', C, H, W]``, ``n' = min(n, smallest class)``.

        One ``torch.rand`` over the padded ``[K, max_count]`` index, sorted per row, takes a random
        permutation of every class at once; padding gets key 2 so it sorts last and is never picked.
        """
        _check_cpu_generator(generator)
        smallest = int(self._counts.min())
        if n < 1 or smallest < 1:
            raise ValueError(
                f"need n >= 1 and every class non-empty; got n={n}, class counts {self._counts.tolist()}"
            )
        n = min(n, smallest)
        keys = torch.rand(self._index.shape, generator=generator).masked_fill_(self._index < 0, 2.0)
        picks = self._index.gather(1, keys.argsort(dim=1)[:, :n])
        images = self.train_images[picks.flatten().to(self.train_images.device)]
        return images.view(self.num_classes, n, *self.train_images.shape[1:])

    def to(self, device: str | torch.device) -> RealSet:
        """The same set with images and labels on ``device`` (the class index stays on the CPU)."""
        return dataclasses.replace(
            self,
            train_images=self.train_images.to(device),
            train_labels=self.train_labels.to(device),
            test_images=self.test_images.to(device),
            test_labels=self.test_labels.to(device),
        )

    def meta(self) -> dict:
        """Plain-value description stored with synthetic sets (no tensors, no ZCA matrices)."""
        return {
            "name": self.name,
            "channels": self.channels,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "mean": list(self.mean),
            "std": list(self.std),
            "zca": self.zca is not None,
        }

    def denormalise(self, x: Tensor) -> Tensor:
        """Images ``[..., C, H, W]`` from the working space back to pixel scale ``[0, 1]`` (not clamped)."""
        return denormalise(x, self.mean, self.std, self.zca)

    def normalise(self, x: Tensor) -> Tensor:
        """Pixel-scale images ``[N, C, H, W]`` in ``[0, 1]`` into the working space (mean/std, then ZCA)."""
        x = _normalise(x, self.mean, self.std)
        if self.zca is not None:
            from ddlib.augment import ZCA

            x = ZCA.from_state_dict(self.zca).transform(x)
        return x


def denormalise(x: Tensor, mean: Sequence[float], std: Sequence[float], zca: dict | None = None) -> Tensor:
    """Images ``[..., C, H, W]`` from a working space (``zca`` state, then mean/std) to pixel scale (not clamped)."""
    if zca is not None:
        from ddlib.augment import ZCA

        # ZCA works on [N, C, H, W]; flatten leading dims so [K, n, C, H, W] batches work too
        x = ZCA.from_state_dict(zca).inverse(x.reshape(-1, *x.shape[-3:])).view(x.shape)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x * s + m


def _check_split(images: Tensor, labels: Tensor, num_classes: int, split: str) -> None:
    """Raise ValueError unless images are ``[N, C, H, H]`` float and labels ``[N]`` int64 in range."""
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"{split} images must be [N, C, H, W] with H == W, got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{split} images must be floating point, got {images.dtype}")
    if labels.ndim != 1 or labels.dtype != torch.int64 or len(labels) != len(images):
        raise ValueError(
            f"{split} labels must be int64 [N={len(images)}], got {labels.dtype} {tuple(labels.shape)}"
        )
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise ValueError(
            f"{split} labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )


def _class_index(labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class counts ``[K]`` and the train positions of each class, ``[K, max_count]`` padded with -1."""
    counts = torch.bincount(labels, minlength=num_classes)
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    sorted_labels = labels[order]
    column = torch.arange(len(labels)) - starts[sorted_labels]
    index = torch.full((num_classes, int(counts.max()) if len(labels) else 0), -1, dtype=torch.int64)
    index[sorted_labels, column] = order
    return counts, index


def _check_cpu_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(
            "pass a CPU torch.Generator (e.g. ddlib.rng.generator(seed, 'real')): indices are drawn on "
            "the CPU so the same seed picks the same images on every device"
        )


# --------------------------------------------------------------------------------------------- registry

_LOADERS: dict[str, Callable[..., RealSet]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., RealSet]], Callable[..., RealSet]]:
    """Decorator registering ``fn(root: Path, image_size, download, **options) -> RealSet`` under ``name``."""

    def decorate(fn: Callable[..., RealSet]) -> Callable[..., RealSet]:
        _LOADERS[name.lower()] = fn
        return fn

    return decorate


def list_datasets() -> list[str]:
    return sorted(_LOADERS)


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` if given, else ``$DDLIB_DATA``, else ``./data``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("DDLIB_DATA")
    return Path(env).expanduser() if env else Path("data")


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    image_size: int | None = None,
    *,
    download: bool = False,
    zca: bool = False,
    device: str | torch.device = "cpu",
    **options,
) -> RealSet:
    """Load a registered dataset as a ``RealSet`` on ``device``.

    ``image_size=None`` takes the dataset's default. ``zca=True`` skips mean/std normalisation and whitens
    with ZCA fitted on the train split (eps 0.1), as MTT/DATM/PAD do. ``options`` go to the dataset's loader
    (e.g. ``mhist_dir=``, ``cache=False`` for MHIST).
    """
    loader = _LOADERS.get(name.lower())
    if loader is None:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
    real = loader(resolve_data_root(root), image_size, download, **options)
    if zca:
        real = _whiten(real)
    return real.to(device)


def from_tensors(
    name: str,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    *,
    info: dict | None = None,
) -> RealSet:
    """A ``RealSet`` from pixel-scale images ``[N, C, H, W]`` in ``[0, 1]`` (float) or ``0..255`` (uint8).

    ``mean``/``std`` default to the per-channel statistics of the train images; class names default to
    ``"0".."K-1"`` with K = largest label + 1.
    """
    owned = train_images.dtype == torch.uint8, test_images.dtype == torch.uint8  # fresh float copies
    train_images, test_images = _to_unit_float(train_images), _to_unit_float(test_images)
    train_labels = torch.as_tensor(train_labels, dtype=torch.int64)
    test_labels = torch.as_tensor(test_labels, dtype=torch.int64)
    if class_names is None:
        top = max(int(train_labels.max()), int(test_labels.max()) if len(test_labels) else -1)
        class_names = [str(k) for k in range(top + 1)]
    channels = train_images.shape[1]
    if mean is None or std is None:
        var, avg = torch.var_mean(train_images, dim=(0, 2, 3), correction=0)
        mean = avg.tolist() if mean is None else mean
        std = var.sqrt().tolist() if std is None else std
    mean, std = _per_channel(mean, channels), _per_channel(std, channels)
    return RealSet(
        name=name,
        train_images=_normalise(train_images, mean, std, in_place=owned[0]),
        train_labels=train_labels,
        test_images=_normalise(test_images, mean, std, in_place=owned[1]),
        test_labels=test_labels,
        class_names=list(class_names),
        mean=mean,
        std=std,
        info=dict(info or {}),
    )


def _to_unit_float(images: Tensor) -> Tensor:
    """uint8 0..255 -> float32 0..1; float stays as is (as float32)."""
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    return images.float()


def _per_channel(value: Sequence[float] | float, channels: int) -> tuple[float, ...]:
    values = (float(value),) * channels if isinstance(value, (int, float)) else tuple(map(float, value))
    if len(values) != channels:
        raise ValueError(f"expected {channels} per-channel values, got {values}")
    return values


def _normalise(images: Tensor, mean: Sequence[float], std: Sequence[float], in_place: bool = False) -> Tensor:
    """``(images - mean) / std`` per channel, ``[N, C, H, W]``; in place only on a tensor the caller owns."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images.sub_(m) if in_place else images - m).div_(s)


def _whiten(real: RealSet) -> RealSet:
    """The set in pixel scale, ZCA-whitened with a transform fitted on its train split."""
    features = real.channels * real.image_size**2
    if features > ZCA_MAX_FEATURES:
        raise ValueError(
            f"ZCA on {real.channels}x{real.image_size}x{real.image_size} images means a "
            f"{features}x{features} covariance ({features**2 * 4 / 2**30:.1f} GiB in float32), too large; "
            f"use zca=False or an image_size with channels*size^2 <= {ZCA_MAX_FEATURES} (e.g. 32 px RGB)"
        )
    from ddlib.augment import ZCA  # lazy: only whitened sets need augment, keep `import ddlib.data` light

    train, test = real.denormalise(real.train_images), real.denormalise(real.test_images)
    zca = ZCA.fit(train, eps=ZCA_EPS)
    return dataclasses.replace(
        real,
        train_images=zca.transform(train),
        test_images=zca.transform(test),
        mean=(0.0,) * real.channels,
        std=(1.0,) * real.channels,
        zca=zca.state_dict(),
        info={**real.info, "zca_eps": ZCA_EPS},
    )


# --------------------------------------------------------------------------------------------- helpers


def _not_found(dataset: str, paths: Iterable[Path], how: str) -> DatasetNotFoundError:
    looked = "\n".join(f"  {p}" for p in paths)
    return DatasetNotFoundError(f"{dataset}: files not found. Looked for:\n{looked}\n{how}\n{README_HINT}")


def _some(items: Sequence[object], limit: int = 10) -> str:
    """``"a, b, c and 7 more"``: a readable list for error messages."""
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _resize_float(images: Tensor, size: int) -> Tensor:
    """Bilinear, antialiased resize of ``[N, C, H, W]`` float images to ``size``x``size`` (no-op if equal)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _check_size(name: str, size: int, low: int, high: int) -> int:
    if not isinstance(size, int) or not low <= size <= high:
        raise ValueError(f"{name}: image_size must be an integer in [{low}, {high}], got {size!r}")
    return size


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- image files


def _decode_one(path: Path, size: int, mode: str) -> tuple[np.ndarray | None, dict]:
    """One image file as ``[size, size, channels]`` uint8, plus its source mode and size (or its error).

    Resizing uses PIL's bicubic filter, which widens its support when shrinking (antialiased) and is
    deterministic; the MHIST 128 px copy was made with the same filter.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            source_mode, source_size = img.mode, img.size
            if img.mode != mode:
                img = img.convert(mode)
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BICUBIC)
            array = np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 -- PIL raises many types for truncated or non-image files
        return None, {"error": f"{path.name} ({type(exc).__name__}: {exc})"}
    return array.reshape(size, size, -1), {"mode": source_mode, "size": source_size}


def _decode_images(
    paths: Sequence[Path], size: int, mode: str, allow_non_square: bool
) -> tuple[Tensor, dict]:
    """``paths`` as ``[N, C, size, size]`` uint8 (C = 1 for mode "L", 3 for "RGB"), and notes for ``info``.

    Raises DatasetFormatError listing every unreadable file (and every non-square one unless allowed).
    """
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
        results = list(pool.map(lambda p: _decode_one(p, size, mode), paths))
    bad = [note["error"] for _, note in results if "error" in note]
    if bad:
        raise DatasetFormatError(
            f"{len(bad)} image file(s) could not be read: {_some(bad)}. "
            "Replace them with intact copies (re-extract the archive)."
        )
    notes = [note for _, note in results]
    non_square = [p.name for p, n in zip(paths, notes) if n["size"][0] != n["size"][1]]
    if non_square and not allow_non_square:
        raise DatasetFormatError(
            f"{len(non_square)} image(s) are not square: {_some(non_square)}. "
            "Crop or pad them to square first."
        )
    converted = Counter(n["mode"] for n in notes if n["mode"] != mode)
    summary = {
        "source_sizes": sorted({f"{w}x{h}" for w, h in (n["size"] for n in notes)}),
        "converted_to_" + mode: dict(converted),
        "resize": "PIL bicubic (antialiased)",
    }
    if non_square:
        summary["non_square_stretched"] = len(non_square)
    stacked = np.stack([a for a, _ in results]) if results else np.zeros((0, size, size, len(mode)), np.uint8)
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous(), summary


# --------------------------------------------------------------------------------------------- digits


@register_dataset("digits")
def _load_digits(root: Path, image_size: int | None, download: bool) -> RealSet:
    """scikit-learn's 1,797 8x8 digits, bilinearly upsampled to ``image_size`` (default 16).

    The split is fixed: 20 % of every class (rounded) goes to test, chosen by ``torch.randperm`` with a
    ``torch.Generator`` seeded 0, so every machine gets the same 1,438/359 images. ``root`` and ``download``
    are unused.
    """
    from sklearn.datasets import load_digits

    size = _check_size("digits", 16 if image_size is None else image_size, 8, 64)
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16).unsqueeze(1)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    split = torch.Generator().manual_seed(0)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        members = torch.nonzero(labels == c).flatten()
        test_mask[members[torch.randperm(len(members), generator=split)[: round(0.2 * len(members))]]] = True
    images = _resize_float(images, size)
    info = {
        "source": "sklearn.datasets.load_digits",
        "split": "stratified 80/20, torch.Generator seed 0",
        "train_size": int((~test_mask).sum()),
        "test_size": int(test_mask.sum()),
    }
    return from_tensors(
        "digits", images[~test_mask], labels[~test_mask], images[test_mask], labels[test_mask], info=info
    )


# --------------------------------------------------------------------------------------------- MNIST


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (raw or .gz) of unsigned bytes as an array of its declared shape."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DatasetFormatError(
            f"{path} is not an IDX file of unsigned bytes (bad magic number); download MNIST again"
        )
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    start = 4 + 4 * ndim
    if len(data) - start != int(np.prod(shape)):
        raise DatasetFormatError(
            f"{path} declares shape {shape} but holds {len(data) - start} values; "
            "the file is truncated, download MNIST again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(shape)


def _find_mnist_files(raw: Path) -> dict[str, Path] | None:
    """The four MNIST files in ``raw`` (each raw or .gz), or None if any is missing."""
    found = {}
    for stem in MNIST_FILES:
        path = next((p for p in (raw / stem, raw / f"{stem}.gz") if p.is_file()), None)
        if path is None:
            return None
        found[stem] = path
    return found


@register_dataset("mnist")
def _load_mnist(root: Path, image_size: int | None, download: bool) -> RealSet:
    """MNIST from ``<root>/MNIST/raw`` (IDX files, raw or gzipped); mean/std 0.1307/0.3081 (the papers')."""
    raw = root / "MNIST" / "raw"
    files = _find_mnist_files(raw)
    if files is None and download:
        from torchvision.datasets import MNIST

        for train in (True, False):
            MNIST(root, train=train, download=True)
        files = _find_mnist_files(raw)
    if files is None:
        raise _not_found(
            "mnist",
            [raw / f"{s}[.gz]" for s in MNIST_FILES],
            "Pass download=True (torchvision fetches it), or copy the four IDX files there.",
        )
    size = _check_size("mnist", 28 if image_size is None else image_size, 8, 256)
    arrays = {stem: _read_idx(path) for stem, path in files.items()}
    splits = []
    for prefix in ("train", "t10k"):
        images = torch.from_numpy(arrays[f"{prefix}-images-idx3-ubyte"].copy()).unsqueeze(1)
        labels = torch.from_numpy(arrays[f"{prefix}-labels-idx1-ubyte"].astype(np.int64))
        if len(images) != len(labels) or images.shape[-2:] != (28, 28):
            raise DatasetFormatError(
                f"MNIST {prefix}: {tuple(images.shape)} images vs {len(labels)} labels; "
                "expected [N, 28, 28] with one label each. Download MNIST again."
            )
        splits += [_resize_float(images.float().div_(255), size), labels]
    info = {
        "root": str(root),
        "files": [str(p) for p in files.values()],
        "train_size": len(splits[1]),
        "test_size": len(splits[3]),
    }
    return from_tensors(
        "mnist", *splits, class_names=[str(k) for k in range(10)], mean=MNIST_MEAN, std=MNIST_STD, info=info
    )


# --------------------------------------------------------------------------------------------- CIFAR-10


@register_dataset("cifar10")
def _load_cifar10(root: Path, image_size: int | None, download: bool) -> RealSet:
    """CIFAR-10 through torchvision (``<root>/cifar-10-batches-py``), which checks the files' MD5s."""
    folder = root / "cifar-10-batches-py"
    if not folder.is_dir() and not download:
        raise _not_found("cifar10", [folder], "Pass download=True (torchvision fetches it, 163 MB).")
    from torchvision.datasets import CIFAR10

    size = _check_size("cifar10", 32 if image_size is None else image_size, 8, 256)
    splits = []
    for train in (True, False):
        ds = CIFAR10(root, train=train, download=download)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float().div_(255)
        splits += [_resize_float(images, size), torch.as_tensor(ds.targets, dtype=torch.int64)]
    info = {
        "root": str(root),
        "files": [str(folder)],
        "train_size": len(splits[1]),
        "test_size": len(splits[3]),
    }
    return from_tensors(
        "cifar10", *splits, class_names=list(ds.classes), mean=CIFAR10_MEAN, std=CIFAR10_STD, info=info
    )


# --------------------------------------------------------------------------------------------- image folder


def _list_class_files(split_dir: Path) -> dict[str, list[Path]]:
    """``{class: sorted image paths}`` for the class sub-folders of ``split_dir``."""
    classes = {}
    for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        classes[folder.name] = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    return classes


def _probe_images(paths: Sequence[Path]) -> tuple[set[tuple[int, int]], set[str]]:
    """The distinct (width, height) and modes of ``paths``, read from headers only."""
    from PIL import Image

    sizes, modes, bad = set(), set(), []
    for path in paths:
        try:
            with Image.open(path) as img:
                sizes.add(img.size)
                modes.add(img.mode)
        except Exception as exc:  # noqa: BLE001 -- any PIL failure means the file is unusable
            bad.append(f"{path.name} ({type(exc).__name__})")
    if bad:
        raise DatasetFormatError(
            f"{len(bad)} image file(s) could not be read: {_some(bad)}. Replace or remove them."
        )
    return sizes, modes


@register_dataset("imagefolder")
def _load_imagefolder(root: Path, image_size: int | None, download: bool) -> RealSet:
    """``root/train/<class>/*.{png,jpg,jpeg}`` and ``root/test/<class>/*``; classes sorted by folder name.

    Without ``image_size`` all images must share one square size; with it, each is resized (bicubic).
    Grayscale data stays one channel; anything else becomes RGB.
    """
    train_dir, test_dir = root / "train", root / "test"
    missing = [d for d in (train_dir, test_dir) if not d.is_dir()]
    if missing:
        raise _not_found(
            "imagefolder", missing, "Arrange images as <root>/{train,test}/<class name>/<image>.png."
        )
    train, test = _list_class_files(train_dir), _list_class_files(test_dir)
    class_names = list(train)
    unknown = sorted(set(test) - set(train))
    empty = [f"train/{c}" for c, files in train.items() if not files]
    if not class_names or unknown or empty:
        raise DatasetFormatError(
            f"imagefolder {root}: train classes {class_names}, test-only classes {unknown}, "
            f"empty class folders {empty}. Every test class needs a non-empty train folder."
        )
    paths = {s: [p for files in d.values() for p in files] for s, d in (("train", train), ("test", test))}
    labels = {
        s: [class_names.index(c) for c, files in d.items() for _ in files]
        for s, d in (("train", train), ("test", test))
    }
    sizes, modes = _probe_images(paths["train"] + paths["test"])
    if image_size is None:
        width, height = next(iter(sizes))
        if len(sizes) != 1 or width != height:
            raise DatasetFormatError(
                f"imagefolder {root}: images have sizes {sorted(sizes)}; they must all be one "
                "square size, or pass image_size= to resize them"
            )
        image_size = width
    mode = "L" if modes <= {"L", "1"} else "RGB"
    decoded = {
        s: _decode_images(paths[s], image_size, mode, allow_non_square=True) for s in ("train", "test")
    }
    info = {
        "root": str(root),
        "train_size": len(paths["train"]),
        "test_size": len(paths["test"]),
        **decoded["train"][1],
    }
    return from_tensors(
        "imagefolder",
        decoded["train"][0],
        labels["train"],
        decoded["test"][0],
        labels["test"],
        class_names=class_names,
        info=info,
    )


# --------------------------------------------------------------------------------------------- MHIST


@dataclass
class _MhistTable:
    """The parsed annotations.csv: one entry per image, in file order."""

    names: list[str]
    labels: list[int]
    agreement: list[int]
    is_train: list[bool]


def _find_mhist_dir(root: Path, mhist_dir: str | os.PathLike | None) -> Path:
    """The first MHIST folder with annotations.csv: ``mhist_dir`` if given, else the usual names in root."""
    if mhist_dir is not None:
        candidates = [Path(mhist_dir).expanduser()]
    else:
        candidates = [root / d for d in MHIST_DIRS]
    for folder in candidates:
        if (folder / "annotations.csv").is_file():
            return folder
    raise _not_found(
        "mhist",
        [c / "annotations.csv" for c in candidates],
        "MHIST cannot be downloaded automatically: request it at https://bmirds.github.io/MHIST/ "
        "(data-use form), then run ddlib.data.prepare_mhist('images.zip', '<root>/mhist').",
    )


def _parse_mhist_csv(text: str, path: Path) -> _MhistTable:
    """Validate and parse MHIST's annotations.csv (any line endings)."""
    rows = [r for r in csv.reader(io.StringIO(text, newline="")) if any(cell.strip() for cell in r)]
    if not rows:
        raise DatasetFormatError(f"{path} is empty; restore the official annotations.csv")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in MHIST_COLUMNS if c not in header]
    extra = [c for c in header if c not in MHIST_COLUMNS]
    if missing or extra:
        raise DatasetFormatError(
            f"{path}: missing columns {missing}, unknown columns {extra}; the header must be "
            f"exactly {list(MHIST_COLUMNS)} (the official annotations.csv)"
        )
    col = {name: header.index(name) for name in MHIST_COLUMNS}
    table, problems = _MhistTable([], [], [], []), []
    for line, row in enumerate(rows[1:], start=2):
        cells = {name: (row[i].strip() if i < len(row) else "") for name, i in col.items()}
        label, split, votes = cells[MHIST_COLUMNS[1]], cells[MHIST_COLUMNS[3]], cells[MHIST_COLUMNS[2]]
        if label not in MHIST_CLASSES:
            problems.append(f"line {line}: unknown label {label!r} (expected HP or SSA)")
        elif split not in ("train", "test"):
            problems.append(f"line {line}: unknown partition {split!r} (expected train or test)")
        elif not (votes.isdigit() and 0 <= int(votes) <= 7):
            problems.append(f"line {line}: annotator count {votes!r} is not an integer 0..7")
        elif not cells[MHIST_COLUMNS[0]]:
            problems.append(f"line {line}: empty image name")
        else:
            table.names.append(cells[MHIST_COLUMNS[0]])
            table.labels.append(MHIST_CLASSES.index(label))
            table.agreement.append(int(votes))
            table.is_train.append(split == "train")
    duplicates = sorted(n for n, k in Counter(table.names).items() if k > 1)
    if duplicates:
        problems.append(f"duplicate image names {_some(duplicates)}")
    if problems:
        raise DatasetFormatError(
            f"{path}: {len(problems)} bad row(s): {_some(problems)}. Use the official annotations.csv."
        )
    return table


def _mhist_fingerprint(csv_bytes: bytes, image_dir: Path, names: Sequence[str], size: int) -> str:
    """sha1 of the CSV, the image files' (name, bytes, mtime_ns), the working size and the cache format.

    Raises DatasetFormatError listing the images the CSV names that are missing.
    """
    digest = hashlib.sha1(csv_bytes)
    missing = []
    for name in sorted(names):
        try:
            stat = (image_dir / name).stat()
        except FileNotFoundError:
            missing.append(name)
            continue
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    if missing:
        raise DatasetFormatError(
            f"{len(missing)} image(s) listed in annotations.csv are missing from {image_dir}: "
            f"{_some(missing)}. Re-extract images.zip (ddlib.data.prepare_mhist)."
        )
    digest.update(f"size={size};version={MHIST_CACHE_VERSION}".encode())
    return digest.hexdigest()


def _cache_dir() -> Path:
    return Path(os.environ.get("DDLIB_CACHE") or Path.home() / ".cache" / "ddlib").expanduser()


def _load_cached(path: Path, names: list[str], size: int) -> tuple[Tensor, dict] | None:
    """Images and notes from the cache file if it exists and matches; None otherwise (warning if corrupt)."""
    if not path.is_file():
        return None
    try:
        entry = load_tensors(path)
        images = entry["images"]
        if (
            entry["names"] != names
            or tuple(images.shape) != (len(names), 3, size, size)
            or images.dtype != torch.uint8
        ):
            raise ValueError("contents do not match annotations.csv")
        if "sha256" in entry and entry["sha256"] != checksum(images):  # files from before the checksum: trusted
            raise ValueError("its sha256 checksum does not match its images (corrupt or truncated)")
        return images, entry["notes"]
    except Exception as exc:  # noqa: BLE001 -- a truncated or foreign file is rebuilt, whatever torch.load raises
        warnings.warn(
            f"ignoring unreadable MHIST cache {path} ({type(exc).__name__}: {exc}); rebuilding it",
            stacklevel=3,
        )
        return None


def _store_cache(path: Path, names: list[str], images: Tensor, notes: dict) -> bool:
    """Write the cache file; False (with a warning) if the cache folder is not writable."""
    try:
        save_tensors({"version": MHIST_CACHE_VERSION, "names": names, "images": images, "notes": notes,
                      "sha256": checksum(images)}, path)
        return True
    except OSError as exc:
        warnings.warn(f"could not write the MHIST cache {path} ({exc}); continuing without it", stacklevel=3)
        return False


@register_dataset("mhist")
def _load_mhist(
    root: Path,
    image_size: int | None,
    download: bool,
    *,
    mhist_dir: str | os.PathLike | None = None,
    cache: bool = True,
) -> RealSet:
    """MHIST (HP = 0, SSA = 1) from ``annotations.csv`` + ``images/``, split by the ``Partition`` column.

    Images of any square size are resized to ``image_size`` (default 128). The decoded uint8 images are cached
    under ``$DDLIB_CACHE`` (else ``~/.cache/ddlib``), keyed by a fingerprint of the CSV, the image files and
    the size; ``cache=False`` decodes afresh without reading or writing the cache.
    """
    size = _check_size("mhist", 128 if image_size is None else image_size, 8, 512)
    folder = _find_mhist_dir(root, mhist_dir)
    csv_path, image_dir = folder / "annotations.csv", folder / "images"
    if not image_dir.is_dir():
        raise _not_found(
            "mhist",
            [image_dir],
            f"annotations.csv is in {folder} but the images/ folder is not; "
            "extract images.zip there (ddlib.data.prepare_mhist).",
        )
    csv_bytes = csv_path.read_bytes()
    table = _parse_mhist_csv(csv_bytes.decode("utf-8-sig"), csv_path)
    fingerprint = _mhist_fingerprint(csv_bytes, image_dir, table.names, size)
    cache_path = _cache_dir() / f"mhist_{size}px_{fingerprint[:20]}.pt"
    cached = _load_cached(cache_path, table.names, size) if cache else None
    if cached is None:
        images, notes = _decode_images(
            [image_dir / n for n in table.names], size, "RGB", allow_non_square=False
        )
        cache_written = cache and _store_cache(cache_path, table.names, images, notes)
    else:
        (images, notes), cache_written = cached, True
    train = torch.tensor(table.is_train)
    labels = torch.tensor(table.labels, dtype=torch.int64)
    csv_md5 = hashlib.md5(csv_bytes).hexdigest()
    info = {
        "root": str(folder),
        "files": [str(csv_path), str(image_dir)],
        "annotations_md5": csv_md5,
        "annotations_official": csv_md5 == OFFICIAL_MD5["annotations.csv"],
        "train_size": int(train.sum()),
        "test_size": int((~train).sum()),
        "train_names": _where(table.names, table.is_train),
        "test_names": _where(table.names, table.is_train, False),
        "train_agreement": _where(table.agreement, table.is_train),
        "test_agreement": _where(table.agreement, table.is_train, False),
        "cache": str(cache_path) if cache_written else None,
        "cache_hit": cached is not None,
        **notes,
    }
    return from_tensors(
        "mhist",
        images[train],
        labels[train],
        images[~train],
        labels[~train],
        class_names=list(MHIST_CLASSES),
        info=info,
    )


def _where(values: list, mask: list[bool], keep: bool = True) -> list:
    return [v for v, m in zip(values, mask) if m == keep]


def _warn_if_not_official(name: str, md5: str) -> None:
    """Warn when an official MHIST file (by name) has a different MD5: a re-saved, partial or other copy."""
    expected = OFFICIAL_MD5[name]
    if md5 != expected:
        warnings.warn(
            f"{name}: MD5 {md5} differs from the official release ({expected}); continuing, but "
            "results may not be comparable with published ones",
            stacklevel=3,
        )


def _find_annotations(source: Path, annotations: str | os.PathLike | None) -> bytes:
    """annotations.csv bytes: the given path, else inside the zip/folder, else beside the zip."""
    if annotations is not None:
        return Path(annotations).expanduser().read_bytes()
    if source.is_file():
        with zipfile.ZipFile(source) as archive:
            inside = [m for m in archive.namelist() if Path(m).name == "annotations.csv"]
            if inside:
                return archive.read(inside[0])
        candidates = [source.parent / "annotations.csv"]
    else:
        candidates = [source / "annotations.csv", source.parent / "annotations.csv"]
    for path in candidates:
        if path.is_file():
            return path.read_bytes()
    raise _not_found("mhist", candidates, "Pass annotations='path/to/annotations.csv' to prepare_mhist.")


def _copy_pngs(files: dict[str, Callable[[], bytes]], image_dir: Path) -> None:
    """Write each ``{name: read}`` to ``image_dir/name`` atomically, skipping files already there in full."""
    if not files:
        raise DatasetFormatError("no PNG images found; pass MHIST's images.zip or the folder it extracts to")
    for name, read in files.items():
        target = image_dir / name
        data = read()
        if target.is_file() and target.stat().st_size == len(data):
            continue
        atomic_write(target, lambda f, data=data: f.write(data))


def prepare_mhist(
    source: str | os.PathLike, dest: str | os.PathLike, annotations: str | os.PathLike | None = None
) -> Path:
    """Lay out MHIST for ``load_dataset("mhist")``: ``dest/annotations.csv`` and ``dest/images/*.png``.

    ``source`` is the course's ``images.zip`` or a folder of PNGs (or a folder with an ``images/``
    sub-folder); ``annotations`` defaults to an ``annotations.csv`` inside or beside it. Files are copied
    byte for byte, atomically one by one; files already there with the same size are skipped, so an
    interrupted run resumes. An official file (``images.zip``, ``annotations.csv``) whose MD5 differs
    only warns. Returns ``dest``.
    """
    source, dest = Path(source).expanduser(), Path(dest).expanduser()
    if not source.exists():
        raise _not_found("mhist", [source], "Pass the path of MHIST's images.zip or of its extracted folder.")
    if source.name in OFFICIAL_MD5 and source.is_file():
        _warn_if_not_official(source.name, _md5(source))
    csv_bytes = _find_annotations(source, annotations)
    _warn_if_not_official("annotations.csv", hashlib.md5(csv_bytes).hexdigest())
    _parse_mhist_csv(csv_bytes.decode("utf-8-sig"), source)  # fail before copying thousands of files
    atomic_write(dest / "annotations.csv", lambda f: f.write(csv_bytes))
    if source.is_file():
        with zipfile.ZipFile(source) as archive:
            members = [m for m in archive.infolist() if _is_png_member(m)]
            _check_unique([Path(m.filename).name for m in members], source)
            # the bare file name is the target: a member path cannot escape dest (zip-slip)
            _copy_pngs(
                {Path(m.filename).name: (lambda m=m: archive.read(m)) for m in members}, dest / "images"
            )
    else:
        folder = source / "images" if (source / "images").is_dir() else source
        _copy_pngs(
            {p.name: p.read_bytes for p in sorted(folder.iterdir()) if p.suffix.lower() == ".png"},
            dest / "images",
        )
    return dest


def _is_png_member(member: zipfile.ZipInfo) -> bool:
    """A PNG in the archive, not a folder or macOS resource-fork junk."""
    name = Path(member.filename).name
    return (
        not member.is_dir()
        and name.lower().endswith(".png")
        and not name.startswith(".")
        and "__MACOSX" not in member.filename
    )


def _check_unique(names: list[str], source: Path) -> None:
    duplicates = sorted(n for n, k in Counter(names).items() if k > 1)
    if duplicates:
        raise DatasetFormatError(f"{source} holds several PNGs named {_some(duplicates)}; keep one of each")
