"""SyntheticSet files: atomic save, checked and code-free loading, validation."""
from __future__ import annotations

import pickle

import pytest
import torch

from ddlib.io import atomic_write
from ddlib.synset import SynsetFormatError, SyntheticSet, class_labels


def _synset(soft: bool = False) -> SyntheticSet:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 1, 8, 8, generator=g)
    labels = torch.randn(6, 3, generator=g) if soft else class_labels(3, 2)
    meta = {"dataset": {"name": "toy", "num_classes": 3, "mean": [0.5], "std": [0.25], "channels": 1,
                        "image_size": 8}, "method": "dm", "history": {"loss": [3.0, 2.0]}}
    return SyntheticSet(images, labels, torch.tensor(0.01), meta)


def test_class_labels_order():
    assert class_labels(3, 2).tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("soft", [False, True])
def test_round_trip(tmp_path, soft):
    s = _synset(soft)
    s.save(tmp_path / "s.pt")
    t = SyntheticSet.load(tmp_path / "s.pt")
    assert torch.equal(s.images, t.images) and torch.equal(s.labels, t.labels) and torch.equal(s.lr, t.lr)
    assert t.meta["history"]["loss"] == [3.0, 2.0]
    assert t.soft_labels is soft
    if not soft:
        assert t.images_per_class == 2


def test_images_per_class_is_the_distilled_ipc_when_soft_labels_moved_an_argmax():
    s = _synset(soft=True)
    s.labels = torch.nn.functional.one_hot(class_labels(3, 2), 3).float()
    s.labels[0] = torch.tensor([0.1, 0.8, 0.1])  # learning moved image 0 (class 0) towards class 1
    assert s.images_per_class == 1  # counted by argmax: class 0 keeps one image
    s.meta["config"] = {"ipc": 2}
    assert s.images_per_class == 2


def test_denormalised_is_pixel_scale():
    s = _synset()
    x = s.denormalised()
    expected = (s.images * 0.25 + 0.5).clamp(0, 1)
    assert torch.allclose(x, expected)


def test_no_temporary_files_left(tmp_path):
    _synset().save(tmp_path / "s.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "s.pt"
    _synset().save(path)
    before = path.read_bytes()

    def explode(f):
        f.write(b"partial")
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, explode)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]


def test_truncated_and_flipped_files_are_detected(tmp_path):
    path = tmp_path / "s.pt"
    _synset().save(path)
    data = bytearray(path.read_bytes())
    (tmp_path / "cut.pt").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(SynsetFormatError):
        SyntheticSet.load(tmp_path / "cut.pt")
    # flip a byte inside the image tensor's storage: the checksum catches it
    s = _synset()
    raw = s.images.numpy().tobytes()
    pos = bytes(data).find(raw[:16])
    assert pos > 0
    data[pos + 3] ^= 0xFF
    (tmp_path / "flip.pt").write_bytes(bytes(data))
    with pytest.raises(SynsetFormatError, match="corrupt|readable"):
        SyntheticSet.load(tmp_path / "flip.pt")


class _Evil:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("evil.pt", "wb") as f:
        pickle.dump({"format": "ddlib.SyntheticSet", "images": _Evil()}, f)
    with pytest.raises(SynsetFormatError):
        SyntheticSet.load("evil.pt")
    assert not (tmp_path / "PWNED").exists()


def test_validation_messages():
    with pytest.raises(SynsetFormatError, match="one row per image"):
        SyntheticSet(torch.zeros(4, 1, 8, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(SynsetFormatError, match="NaN"):
        SyntheticSet(torch.full((2, 1, 8, 8), float("nan")), torch.zeros(2, dtype=torch.long))
    with pytest.raises(SynsetFormatError, match=r"\[N, C, H, W\]"):
        SyntheticSet(torch.zeros(4, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(FileNotFoundError):
        SyntheticSet.load("/nonexistent/synset.pt")
