"""Files written atomically and read safely.

Every file ddlib writes goes to a temporary file in the same folder, is flushed to disk and then
renamed over the target, so a crash or an interrupt leaves either the old file or the new one,
never half of one.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["atomic_write", "save_json", "load_json", "save_tensors", "load_tensors", "DiskFullError",
           "checksum", "plain", "save_checked", "load_checked"]


class DiskFullError(OSError):
    """The disk filled up while a file was written; the previous version of the file is intact."""


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(path, exc) from exc
        raise
    return path


def _disk_full(path: Path, exc: OSError) -> DiskFullError:
    kept = "the previous file there is unchanged" if path.exists() else "nothing was written there"
    return DiskFullError(exc.errno, f"disk full while writing {path} (in {path.parent}): {kept}; free some "
                         f"space there or write to another folder, then run again")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    return atomic_write(path, lambda f: f.write(text), mode="w")


def load_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def save_tensors(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically. ``obj`` should hold only tensors and plain Python values."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def load_tensors(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: a file from elsewhere cannot run code."""
    return torch.load(path, map_location=map_location, weights_only=True)


def checksum(value: Any) -> str:
    """sha256 (hex) over ``value``: nested dicts (sorted keys), lists, tensors (shape, dtype, bytes), scalars."""
    h = hashlib.sha256()
    _hash(h, value)
    return h.hexdigest()


def _hash(h: "hashlib._Hash", value: Any) -> None:
    if isinstance(value, dict):
        try:
            keys = sorted(value)
        except TypeError:  # mixed key types
            keys = sorted(value, key=repr)
        for k in keys:
            h.update(repr(k).encode())
            _hash(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for v in value:
            _hash(h, v)
        h.update(b"]")
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{tuple(value.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(repr(value).encode())


def plain(value: Any) -> Any:
    """``value`` reduced to what ``torch.load(weights_only=True)`` accepts: dicts, lists, scalars, tensors."""
    if isinstance(value, dict):  # int keys stay int: optimiser states are keyed by parameter index
        return {(k if type(k) in (str, int) else str(k)): plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, (str, Path)):  # str subclasses (torch.__version__) would need an unpickler allowance
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return repr(value)


def save_checked(payload: dict[str, Any], path: str | os.PathLike, kind: str) -> Path:
    """Save ``payload`` (plain values and tensors) atomically as a ``kind`` file with a sha256 of its contents."""
    body = plain(payload)
    return save_tensors({"format": kind, "body": body, "sha256": checksum(body)}, path)


def load_checked(path: str | os.PathLike, kind: str, error: type[Exception], hint: str) -> dict[str, Any]:
    """The payload of a ``save_checked`` file. Never runs code from it (``weights_only``); ``error(message)``
    naming the file and ``hint`` (what to do) when it is unreadable, of another kind, or fails its checksum."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {kind} file at {path}")
    try:
        saved = load_tensors(path)
    except Exception as exc:  # noqa: BLE001 -- truncated zip, a pickle that wants to run code, garbage bytes
        reason = load_failure(exc)
        raise error(f"{path} is not a readable {kind} file ({type(exc).__name__}: {reason}); {hint}") from None
    if not isinstance(saved, dict) or saved.get("format") != kind or "body" not in saved:
        raise error(f"{path} is not a {kind} file; {hint}")
    if saved.get("sha256") != checksum(saved["body"]):
        raise error(f"{path} is corrupt: its sha256 checksum does not match its contents; {hint}")
    return saved["body"]


def load_failure(exc: BaseException) -> str:
    """One line on why ``torch.load`` failed (for weights_only refusals, the global the file wanted)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    refused = [line for line in lines if "Unsupported global" in line or "WeightsUnpickler error" in line]
    return (refused or lines or [""])[0][:200]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
