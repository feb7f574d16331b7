"""ddlib.data: loaders on tiny fixtures written in each dataset's real format, sampling, errors, caching."""

from __future__ import annotations

import gzip
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import write_idx
from PIL import Image

from ddlib import data
from ddlib.data import DatasetFormatError, DatasetNotFoundError, from_tensors, load_dataset, prepare_mhist
from ddlib.rng import generator

MHIST_HEADER = "Image Name,Majority Vote Label,Number of Annotators who Selected SSA (Out of 7),Partition"
# (label, annotators, partition, source size): 5 HP + 3 SSA train, 2 HP + 2 SSA test, two source sizes
MHIST_ROWS = [
    ("HP", 0, "train", 32),
    ("SSA", 6, "train", 24),
    ("HP", 1, "train", 32),
    ("HP", 2, "test", 24),
    ("SSA", 7, "train", 32),
    ("HP", 0, "train", 24),
    ("SSA", 5, "test", 32),
    ("HP", 3, "train", 24),
    ("SSA", 4, "train", 32),
    ("HP", 1, "test", 24),
    ("HP", 0, "train", 32),
    ("SSA", 7, "test", 24),
]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def digits() -> data.RealSet:
    return load_dataset("digits")


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("DDLIB_CACHE", str(folder))
    return folder


def write_png(path: Path, size: int, seed: int, mode: str = "RGB", height: int | None = None) -> None:
    """A random ``size``x``height`` image, deterministic in ``seed``."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height or size, size, channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)


def write_mhist(folder: Path, rows=MHIST_ROWS, header: str = MHIST_HEADER) -> list[str]:
    """annotations.csv (CRLF, like the official file) and ``images/``; returns the image names."""
    names = [f"MHIST_a{i:02d}.png" for i in range(len(rows))]
    lines = [header] + [f"{n},{label},{votes},{split}" for n, (label, votes, split, _) in zip(names, rows)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "annotations.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    for i, (name, row) in enumerate(zip(names, rows)):
        write_png(folder / "images" / name, row[3], seed=i)
    return names


def write_mnist(root: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", 30), ("t10k", 10)):
        write_idx(
            root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte{suffix}",
            rng.integers(0, 256, (n, 28, 28)).astype(np.uint8),
        )
        write_idx(root / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10)


# ------------------------------------------------------------------------------------------ digits, RealSet


def test_digits_shapes_split_and_normalisation(digits):
    assert digits.train_images.shape == (1438, 1, 16, 16) and digits.test_images.shape == (359, 1, 16, 16)
    assert (digits.channels, digits.image_size, digits.num_classes) == (1, 16, 10)
    assert digits.class_names == [str(k) for k in range(10)]
    assert digits.train_labels.dtype == torch.int64
    # 20 % of every class (rounded) is test
    all_counts = digits.class_counts + torch.bincount(digits.test_labels, minlength=10)
    assert torch.equal(torch.bincount(digits.test_labels, minlength=10), (all_counts * 0.2).round().long())
    assert abs(digits.train_images.mean().item()) < 1e-4
    assert abs(digits.train_images.std().item() - 1) < 1e-3
    pixels = digits.denormalise(digits.train_images)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_digits_deterministic_and_resizable(digits):
    again = load_dataset("DIGITS")  # names are case-insensitive
    assert torch.equal(again.train_images, digits.train_images) and torch.equal(
        again.test_labels, digits.test_labels
    )
    assert load_dataset("digits", image_size=8).train_images.shape[-1] == 8
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", image_size=4)


def test_sample_distinct_reproducible_and_of_the_class(digits):
    x = digits.sample(3, 20, generator(0, "s"))
    assert x.shape == (20, 1, 16, 16)
    assert torch.equal(x, digits.sample(3, 20, generator(0, "s")))
    assert not torch.equal(x, digits.sample(3, 20, generator(1, "s")))
    class3 = digits.train_images[digits.train_labels == 3].flatten(1)
    matches = (x.flatten(1)[:, None] == class3[None]).all(-1)  # [20, count]: which class-3 image each one is
    assert (matches.sum(1) >= 1).all()
    assert len({int(row.nonzero()[0]) for row in matches}) == 20  # no image drawn twice


def test_sample_too_many_names_the_class_and_its_size(digits):
    count = int(digits.class_counts[3])
    with pytest.raises(ValueError, match=rf"class 3 .*{count} training images"):
        digits.sample(3, count + 1, generator(0))


def test_sample_per_class(digits):
    x = digits.sample_per_class(7, generator(0, "pc"))
    assert x.shape == (10, 7, 1, 16, 16)
    assert torch.equal(x, digits.sample_per_class(7, generator(0, "pc")))
    flat = digits.train_images.flatten(1)
    for c in range(10):
        hits = (x[c].flatten(1)[:, None] == flat[None]).all(-1).float().argmax(1)
        assert (digits.train_labels[hits] == c).all()
        assert len(set(hits.tolist())) == 7
    # n is capped at the smallest class
    assert digits.sample_per_class(10_000, generator(0)).shape[1] == int(digits.class_counts.min())


def test_to_meta_and_from_tensors_roundtrip(digits):
    moved = digits.to("cpu")
    assert torch.equal(moved.sample(2, 5, generator(4)), digits.sample(2, 5, generator(4)))
    meta = digits.meta()
    assert meta["zca"] is False and meta["channels"] == 1 and meta["mean"] == list(digits.mean)
    pixels = torch.rand(20, 3, 4, 4, generator=generator(0, "pixels"))
    untouched = pixels.clone()
    real = from_tensors("toy", pixels, torch.arange(20) % 2, pixels[:4], torch.tensor([0, 1, 0, 1]))
    assert real.class_names == ["0", "1"] and len(real.mean) == 3
    assert torch.allclose(real.denormalise(real.train_images), pixels, atol=1e-6)
    assert torch.equal(pixels, untouched)
    fixed = from_tensors(
        "toy", pixels, torch.arange(20) % 2, pixels, torch.arange(20) % 2, mean=0.5, std=0.25
    )
    assert torch.allclose(fixed.train_images, (pixels - 0.5) / 0.25)


def test_registry_and_unknown_name():
    assert {"digits", "mnist", "mhist", "cifar10", "imagefolder"} <= set(data.list_datasets())
    with pytest.raises(ValueError, match="available: .*digits"):
        load_dataset("nope")


def test_resolve_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DDLIB_DATA", raising=False)
    assert data.resolve_data_root() == Path("data")
    monkeypatch.setenv("DDLIB_DATA", str(tmp_path / "env"))
    assert data.resolve_data_root() == tmp_path / "env"
    assert data.resolve_data_root(tmp_path / "arg") == tmp_path / "arg"


def test_zca_whitening():
    augment = pytest.importorskip("ddlib.augment")
    if not hasattr(augment, "ZCA"):
        pytest.skip("ddlib.augment.ZCA not written yet")
    real = load_dataset("digits", image_size=8, zca=True)
    assert real.zca is not None and real.mean == (0.0,) and real.std == (1.0,) and real.meta()["zca"] is True
    plain = load_dataset("digits", image_size=8)
    assert torch.allclose(
        real.denormalise(real.train_images), plain.denormalise(plain.train_images), atol=1e-3
    )
    batch = real.denormalise(real.sample_per_class(2, generator(0)))  # [K, n, C, H, W] works too
    assert torch.allclose(batch, plain.denormalise(plain.sample_per_class(2, generator(0))), atol=1e-3)


def test_zca_refused_for_large_images(tmp_path, cache_dir):
    write_mhist(tmp_path / "mhist")
    with pytest.raises(ValueError, match="covariance"):
        load_dataset("mhist", root=tmp_path, image_size=40, zca=True)  # 3*40*40 = 4800 features


# ------------------------------------------------------------------------------------------ MNIST, CIFAR-10


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_idx_files(tmp_path, gz):
    write_mnist(tmp_path, gz)
    real = load_dataset("mnist", root=tmp_path)
    assert real.train_images.shape == (30, 1, 28, 28) and real.test_images.shape == (10, 1, 28, 28)
    assert real.train_labels.tolist() == [k % 10 for k in range(30)]
    assert real.mean == (0.1307,) and real.std == (0.3081,)
    raw = np.frombuffer(
        gzip.decompress((tmp_path / "MNIST/raw/t10k-images-idx3-ubyte.gz").read_bytes())
        if gz
        else (tmp_path / "MNIST/raw/t10k-images-idx3-ubyte").read_bytes(),
        np.uint8,
        offset=16,
    )
    expected = torch.from_numpy(raw.reshape(10, 1, 28, 28).astype(np.float32) / 255)
    assert torch.allclose(real.denormalise(real.test_images), expected, atol=1e-6)
    assert load_dataset("mnist", root=tmp_path, image_size=32).image_size == 32


def test_mnist_truncated_file(tmp_path):
    write_mnist(tmp_path, gz=False)
    path = tmp_path / "MNIST/raw/train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetFormatError, match="truncated"):
        load_dataset("mnist", root=tmp_path)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
        ("cifar10", "cifar-10-batches-py"),
        ("mhist", "mhist/annotations.csv"),
    ],
)
def test_not_found_names_the_paths(tmp_path, name, expected):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(name, root=tmp_path)
    assert str(tmp_path / expected) in str(err.value) and "data/README.md" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


# ------------------------------------------------------------------------------------------ MHIST


def test_mhist_loads_splits_labels_and_stats(tmp_path, cache_dir):
    write_mhist(tmp_path / "mhist")
    real = load_dataset("mhist", root=tmp_path, image_size=16)
    assert real.train_images.shape == (8, 3, 16, 16) and real.test_images.shape == (4, 3, 16, 16)
    assert real.class_names == ["HP", "SSA"]
    assert real.train_labels.tolist() == [0, 1, 0, 1, 0, 0, 1, 0]  # HP = 0, SSA = 1, in file order
    assert real.test_labels.tolist() == [0, 1, 0, 1]
    assert real.info["train_agreement"] == [r[1] for r in MHIST_ROWS if r[2] == "train"]
    assert real.info["source_sizes"] == ["24x24", "32x32"]
    assert abs(real.train_images.mean().item()) < 1e-4  # normalised with the train statistics it stores
    pixels = real.denormalise(real.train_images)
    assert torch.allclose(pixels.mean(dim=(0, 2, 3)), torch.tensor(real.mean), atol=1e-5)
    assert torch.allclose(pixels.std(dim=(0, 2, 3), correction=0), torch.tensor(real.std), atol=1e-5)
    assert real.info["cache_hit"] is False and not real.info["annotations_official"]


def test_mhist_cache_hit_and_rebuild(tmp_path, cache_dir):
    names = write_mhist(tmp_path / "MHIST")
    first = load_dataset("mhist", root=tmp_path, image_size=16)
    files = list(cache_dir.glob("mhist_16px_*.pt"))
    assert len(files) == 1 and first.info["cache"] == str(files[0])
    second = load_dataset("mhist", root=tmp_path, image_size=16)
    assert second.info["cache_hit"] is True
    assert torch.equal(first.train_images, second.train_images) and torch.equal(
        first.test_images, second.test_images
    )
    # another working size is another key
    assert load_dataset("mhist", root=tmp_path, image_size=8).info["cache_hit"] is False
    # a changed image changes the fingerprint
    image = tmp_path / "MHIST" / "images" / names[0]
    write_png(image, 32, seed=99)
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    third = load_dataset("mhist", root=tmp_path, image_size=16)
    assert third.info["cache_hit"] is False and not torch.equal(third.train_images[0], first.train_images[0])
    # a corrupt cache file is rebuilt, not fatal
    Path(third.info["cache"]).write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="rebuilding"):
        fourth = load_dataset("mhist", root=tmp_path, image_size=16)
    assert torch.equal(fourth.train_images, third.train_images)
    assert load_dataset("mhist", root=tmp_path, image_size=16).info["cache_hit"] is True


def test_mhist_without_cache_and_explicit_dir(tmp_path, cache_dir):
    write_mhist(tmp_path / "elsewhere")
    real = load_dataset(
        "mhist", root=tmp_path / "unused", image_size=16, mhist_dir=tmp_path / "elsewhere", cache=False
    )
    assert len(real.train_labels) == 8 and real.info["cache"] is None and not cache_dir.exists()


def test_mhist_unwritable_cache_is_skipped(tmp_path, monkeypatch):
    write_mhist(tmp_path / "mhist")
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("DDLIB_CACHE", str(tmp_path / "a_file" / "cache"))  # cannot become a folder
    with pytest.warns(UserWarning, match="continuing without it"):
        real = load_dataset("mhist", root=tmp_path, image_size=16)
    assert real.info["cache"] is None and len(real.test_labels) == 4


def test_mhist_without_images_folder(tmp_path, cache_dir):
    write_mhist(tmp_path / "mhist")
    for png in (tmp_path / "mhist" / "images").iterdir():
        png.unlink()
    (tmp_path / "mhist" / "images").rmdir()
    with pytest.raises(DatasetNotFoundError, match="images"):
        load_dataset("mhist", root=tmp_path)


def test_mhist_converts_rgba_and_says_so(tmp_path, cache_dir):
    names = write_mhist(tmp_path / "mhist")
    write_png(tmp_path / "mhist" / "images" / names[1], 24, seed=5, mode="RGBA")
    real = load_dataset("mhist", root=tmp_path, image_size=16, cache=False)
    assert real.info["converted_to_RGB"] == {"RGBA": 1}


def test_mhist_missing_image_is_listed(tmp_path, cache_dir):
    names = write_mhist(tmp_path / "mhist")
    (tmp_path / "mhist" / "images" / names[4]).unlink()
    with pytest.raises(DatasetFormatError, match=rf"1 image.*missing.*{names[4]}"):
        load_dataset("mhist", root=tmp_path, image_size=16)


def test_mhist_corrupt_and_non_square_images_are_listed(tmp_path, cache_dir):
    names = write_mhist(tmp_path / "mhist")
    (tmp_path / "mhist" / "images" / names[2]).write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetFormatError, match=rf"could not be read: {names[2]}"):
        load_dataset("mhist", root=tmp_path, image_size=16)
    write_png(tmp_path / "mhist" / "images" / names[2], 24, seed=2, height=20)
    with pytest.raises(DatasetFormatError, match=rf"not square: {names[2]}"):
        load_dataset("mhist", root=tmp_path, image_size=16)


def test_mhist_bad_column_and_unknown_label(tmp_path, cache_dir):
    write_mhist(tmp_path / "mhist", header=MHIST_HEADER.replace("Partition", "Split"))
    with pytest.raises(
        DatasetFormatError, match=r"missing columns \['Partition'\], unknown columns \['Split'\]"
    ):
        load_dataset("mhist", root=tmp_path, image_size=16)
    write_mhist(tmp_path / "mhist", rows=MHIST_ROWS[:3] + [("TA", 3, "train", 24)] + MHIST_ROWS[4:])
    with pytest.raises(DatasetFormatError, match="line 5: unknown label 'TA'"):
        load_dataset("mhist", root=tmp_path, image_size=16)


def test_prepare_mhist_from_zip(tmp_path, cache_dir):
    names = write_mhist(tmp_path / "src")
    archive = tmp_path / "download" / "images.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        for name in names:
            zf.write(tmp_path / "src" / "images" / name, f"images/{name}")
        zf.writestr("__MACOSX/images/._MHIST_a00.png", b"junk")
    (tmp_path / "download" / "annotations.csv").write_bytes(
        (tmp_path / "src" / "annotations.csv").read_bytes()
    )
    with pytest.warns(UserWarning, match="MD5"):  # a fixture is not the official release
        dest = prepare_mhist(archive, tmp_path / "data" / "mhist")
    assert dest == tmp_path / "data" / "mhist"
    assert sorted(p.name for p in (dest / "images").iterdir()) == names
    assert (dest / "annotations.csv").read_bytes() == (tmp_path / "src" / "annotations.csv").read_bytes()
    assert load_dataset("mhist", root=tmp_path / "data", image_size=16).info["train_size"] == 8
    with pytest.warns(UserWarning):  # a second run resumes over the same files
        prepare_mhist(tmp_path / "src" / "images", dest, annotations=tmp_path / "src" / "annotations.csv")


# ------------------------------------------------------------------------------------------ image folder


def test_imagefolder(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for c, cls in enumerate(("cat", "ant")):
            for i in range(n):
                write_png(tmp_path / split / cls / f"{i}.png", 8, seed=10 * c + i, mode="L")
    real = load_dataset("imagefolder", root=tmp_path)
    assert real.class_names == ["ant", "cat"]  # sorted by name
    assert real.train_images.shape == (6, 1, 8, 8) and real.test_labels.tolist() == [0, 0, 1, 1]
    write_png(tmp_path / "train" / "cat" / "big.jpg", 12, seed=7, mode="RGB")
    with pytest.raises(DatasetFormatError, match="image_size"):
        load_dataset("imagefolder", root=tmp_path)
    mixed = load_dataset("imagefolder", root=tmp_path, image_size=10)
    assert mixed.train_images.shape == (7, 3, 10, 10) and mixed.class_counts.tolist() == [3, 4]
