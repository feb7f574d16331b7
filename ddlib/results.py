"""The runs table: one JSON line per CLI or notebook run, the leaderboard built from it, and its figures.

A row is ``{"schema", "timestamp", "source", "metrics", "params", "code", "machine"}`` where ``metrics``
follows the ``metrics.json`` schema the CLI writes (method, dataset, ipc, model, protocol, accuracies,
accuracy_mean/std, random_accuracy_mean/std, distill_seconds, peak_memory_bytes, ...), ``code`` is
``code_version()`` and ``machine`` is ``ddlib.utils.environment()``.

The table lives at ``--results PATH``, else ``$DDLIB_RESULTS``, else ``<repo>/results/runs.jsonl`` (the
nearest folder above the working directory holding ``pyproject.toml`` or ``.git``). ``DDLIB_RESULTS=off``
turns recording off; under pytest recording is off unless ``DDLIB_RESULTS`` is set, so the test suite never
writes into the repository's table. Notebooks call ``record_evaluation(result, params, method=..., ...)``
(or ``record(metrics, params)``) for each set they evaluate; smoke runs pass ``params["smoke"]`` and stay off the
leaderboard.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

__all__ = ["record", "record_evaluation", "evaluation_metrics", "make_row", "append_row", "read_rows",
           "results_path", "code_version", "PUBLISHED",
           "Published", "published_accuracy", "runs_frame", "leaderboard", "format_table", "markdown_table",
           "latex_table", "plot_all", "SCHEMA"]

SCHEMA = 1
DEFAULT_RELATIVE = Path("results") / "runs.jsonl"
OFF_VALUES = ("off", "0", "none", "false")
LOCK_TIMEOUT_S = 60.0  # a writer waiting longer than this for the lock gives up with an error


# ------------------------------------------------------------------------------------------ published numbers
@dataclass(frozen=True)
class Published:
    dataset: str      # ddlib dataset name
    method: str       # ddlib method name ("full" for the whole training set)
    ipc: int | None   # images per class (None for the whole dataset)
    mean: float       # test accuracy, %
    std: float        # its std, % (conventions differ between papers)
    source: str       # where the number comes from


_SRC = "reference/algorithms.md §9"
# (method, source) -> accuracies at IPC 1, 10, 50 as (mean, std) or None where not published.
_CIFAR10 = {
    ("random", "DC paper Tab.1"): [(14.4, 2.0), (26.0, 1.2), (43.4, 1.0)],
    ("herding", "DC paper Tab.1"): [(21.5, 1.2), (31.6, 0.7), (40.4, 0.6)],
    ("kcenter", "DC paper Tab.1"): [(21.5, 1.3), (14.7, 0.9), (27.0, 1.4)],
    ("forgetting", "DC paper Tab.1"): [(13.5, 1.2), (23.3, 1.0), (23.3, 1.1)],
    ("dd", "DC paper Tab.1 (random init)"): [None, (36.8, 1.2), None],
    ("dc", "VICO README; PAD Tab.1"): [(28.3, 0.5), (44.9, 0.5), (53.9, 0.5)],
    ("dsa", "VICO README; PAD Tab.1"): [(28.8, 0.7), (52.1, 0.5), (60.6, 0.5)],
    ("dm", "DM paper; PAD Tab.1"): [(26.0, 0.8), (48.9, 0.6), (63.0, 0.4)],
    ("mtt", "MTT paper Tab.1"): [(46.3, 0.8), (65.3, 0.7), (71.6, 0.2)],
    ("datadam", "DataDAM paper Tab.1"): [(32.0, 1.2), (54.2, 0.8), (67.0, 0.4)],
    ("datm", "DATM paper Tab.1; PAD Tab.1"): [(46.9, 0.5), (66.8, 0.2), (76.1, 0.3)],
    ("pad", "PAD paper Tab.1"): [(47.2, 0.6), (67.4, 0.3), (77.0, 0.5)],
}
_MNIST = {
    ("random", "DC paper Tab.1"): [(64.9, 3.5), (95.1, 0.9), (97.9, 0.2)],
    ("herding", "DC paper Tab.1"): [(89.2, 1.6), (93.7, 0.3), (94.8, 0.2)],
    ("kcenter", "DC paper Tab.1"): [(89.3, 1.5), (84.4, 1.7), (97.4, 0.3)],
    ("forgetting", "DC paper Tab.1"): [(35.5, 5.6), (68.1, 3.3), (88.2, 1.2)],
    ("dd", "DC paper Tab.1"): [None, (79.5, 8.1), None],
    ("ld", "KIP paper table"): [(60.9, 3.2), (87.3, 0.7), (93.3, 0.3)],
    ("dc", "DC README; KIP table"): [(91.7, 0.5), (97.4, 0.2), (98.8, 0.2)],
    ("dsa", "DSA README; KIP table"): [(88.7, 0.6), (97.8, 0.1), (99.2, 0.1)],
    ("dm", "DM paper"): [(89.7, 0.6), (97.5, 0.1), (98.6, 0.1)],
}
_FASHION = {
    ("random", "DC paper Tab.1"): [(51.4, 3.8), (73.8, 0.7), (82.5, 0.7)],
    ("herding", "DC paper Tab.1"): [(67.0, 1.9), (71.1, 0.7), (71.9, 0.8)],
    ("kcenter", "DC paper Tab.1"): [(66.9, 1.8), (54.7, 1.5), (68.3, 0.8)],
    ("forgetting", "DC paper Tab.1"): [(42.0, 5.5), (53.9, 2.0), (55.0, 1.1)],
    ("dc", "DC README; KIP table"): [(70.5, 0.6), (82.3, 0.4), (83.6, 0.4)],
    ("dsa", "DSA README; KIP table"): [(70.6, 0.6), (84.6, 0.3), (88.7, 0.2)],
}
_FULL = {"cifar10": (84.8, 0.1, "DC paper; PAD Tab.1"), "mnist": (99.6, 0.0, "DC paper"),
         "fashionmnist": (93.5, 0.1, "DC paper")}


def _published() -> tuple[Published, ...]:
    rows = []
    for dataset, table in (("cifar10", _CIFAR10), ("mnist", _MNIST), ("fashionmnist", _FASHION)):
        for (method, source), values in table.items():
            for ipc, value in zip((1, 10, 50), values):
                if value is not None:
                    rows.append(Published(dataset, method, ipc, value[0], value[1], f"{source} ({_SRC})"))
    for dataset, (mean, std, source) in _FULL.items():
        rows.append(Published(dataset, "full", None, mean, std, f"{source} ({_SRC})"))
    return tuple(rows)


# ConvNet test accuracies (%) of algorithms.md §9; MHIST has no published numbers (course projects only).
PUBLISHED: tuple[Published, ...] = _published()


def published_accuracy(dataset: str, method: str, ipc: int | None) -> Published | None:
    """The published number for (dataset, method, ipc), or None."""
    for p in PUBLISHED:
        if (p.dataset, p.method, p.ipc) == (dataset, method, ipc):
            return p
    return None


# ------------------------------------------------------------------------------------------ where and what
def repo_root(start: str | os.PathLike | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: cwd) holding pyproject.toml or .git; else ``start``."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() or (folder / ".git").exists():
            return folder
    return here


def results_path(path: str | os.PathLike | None = None) -> Path | None:
    """The table to use: ``path``, else $DDLIB_RESULTS, else <repo>/results/runs.jsonl; None when turned off."""
    chosen = str(path) if path else os.environ.get("DDLIB_RESULTS", "")
    if chosen.lower() in OFF_VALUES and chosen:
        return None
    if chosen:
        return Path(chosen).expanduser()
    if os.environ.get("PYTEST_CURRENT_TEST"):
        return None  # tests must not write into the repository's table
    return repo_root() / DEFAULT_RELATIVE


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def source_hash(folder: str | os.PathLike | None = None) -> str:
    """sha256 (first 12 hex digits) over the relative paths and contents of every .py file of ``folder``."""
    folder = Path(folder or _package_dir())
    digest = hashlib.sha256()
    for file in sorted(folder.rglob("*.py")):
        digest.update(file.relative_to(folder).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _git(args: Sequence[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=cwd, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version() -> dict[str, Any]:
    """The code a run used: git commit, whether ddlib/ differs from it, and a hash of ddlib's sources.

    The source hash decides whether a notebook must be re-run (it ignores edits outside the package,
    e.g. to results files); commit and dirty flag say where to find the code.
    """
    pkg = _package_dir()
    commit = _git(["rev-parse", "--short", "HEAD"], pkg)
    status = _git(["status", "--porcelain", "--", "."], pkg) if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status), "source_hash": source_hash(pkg)}


# ------------------------------------------------------------------------------------------ writing rows
def make_row(metrics: dict[str, Any], params: dict[str, Any] | None = None, *, source: str = "",
             machine: dict[str, Any] | None = None) -> dict[str, Any]:
    """One table row; ``metrics['environment']`` (as the CLI writes it) becomes the row's machine."""
    metrics = dict(metrics)
    env = metrics.pop("environment", None)
    if machine is None:
        machine = env if env is not None else _environment()
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    return {"schema": SCHEMA, "timestamp": stamp, "source": source or _default_source(), "metrics": metrics,
            "params": dict(params or {}), "code": code_version(), "machine": machine}


def _default_source() -> str:
    """The runner's name for the run, else "notebook" inside a Jupyter kernel, else the script's name."""
    script = Path(sys.argv[0] or "python").name
    return os.environ.get("DDLIB_RUN_NAME") or ("notebook" if script.startswith("ipykernel") else script)


def _environment() -> dict[str, Any]:
    from ddlib.utils import environment

    return environment()


def record(metrics: dict[str, Any], params: dict[str, Any] | None = None, *, source: str = "",
           path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Append one row (metrics, params, code version, machine, time) to the runs table; return the row.

    Notebooks call this with their metrics dict and their parameters; nothing is written when
    recording is off (see ``results_path``).
    """
    row = make_row(metrics, params, source=source)
    target = results_path(path)
    if target is not None:
        append_row(row, target)
    return row


def evaluation_metrics(result, *, method: str, dataset: str, ipc: int | None, seed: int | None = None,
                       random=None, **extra: Any) -> dict[str, Any]:
    """A CLI-shaped metrics dict (the ``metrics.json`` schema) from an ``EvalResult`` (or its ``summary()``) of
    a synthetic set and, optionally, that of its random-subset baseline; ``extra`` adds fields
    (distill_seconds, ...)."""
    summary = _summary(result)
    protocol = summary.pop("protocol", None) or {}
    metrics = {"method": method, "dataset": dataset, "ipc": ipc, "seed": seed, **summary,
               "protocol": protocol.get("name"), "eval_epochs": protocol.get("epochs")}
    if random is not None:
        base = _summary(random)
        metrics.update(random_accuracy_mean=base["accuracy_mean"], random_accuracy_std=base["accuracy_std"],
                       random_accuracies=list(base["accuracies"]))
    metrics.update(extra)
    return metrics


def _summary(result) -> dict[str, Any]:
    """An ``EvalResult``'s ``summary()``, or a copy of a summary already given as a dict."""
    return dict(result if isinstance(result, dict) else result.summary())


def record_evaluation(result, params: dict[str, Any] | None = None, *, method: str, dataset: str,
                      ipc: int | None, seed: int | None = None, random=None, source: str = "",
                      **extra: Any) -> dict[str, Any]:
    """``record`` for a notebook's evaluated set: one leaderboard row (see ``evaluation_metrics``)."""
    metrics = evaluation_metrics(result, method=method, dataset=dataset, ipc=ipc, seed=seed, random=random,
                                 **extra)
    return record(metrics, params, source=source)


def import_metrics(paths: Sequence[str | os.PathLike], table: str | os.PathLike | None = None) -> list[Path]:
    """Append every ``metrics.json`` found under ``paths`` (files or folders) that the table does not yet
    hold (matched by source ``import:<path>``); return the files imported. For runs made before the
    table existed, or copied from another machine."""
    target = results_path(table)
    if target is None:
        raise ValueError("recording is off (DDLIB_RESULTS=off); pass --results PATH to import into a table")
    known = {row.get("source") for row in read_rows(target)}
    found = sorted({f for p in map(Path, paths) for f in ([p] if p.is_file() else p.rglob("metrics.json"))})
    imported = []
    for file in found:
        source = f"import:{file.as_posix()}"
        if source in known:
            continue
        metrics = json.loads(file.read_text())
        if not isinstance(metrics, dict) or "accuracy_mean" not in metrics:
            continue  # not a run's metrics (e.g. a notebook's own summary file)
        row = make_row(metrics, {k: metrics[k] for k in ("method", "dataset", "ipc", "seed") if k in metrics},
                       source=source)
        append_row(row, target)
        imported.append(file)
    return imported


def append_row(row: dict[str, Any], path: str | os.PathLike) -> Path:
    """Append ``row`` as one JSON line, holding a lock so parallel writers never interleave.

    Under the lock the whole file is rewritten atomically (temporary file, then rename), so a crash
    leaves the old table or the new one and never half a line.
    """
    from ddlib.io import _json_default, atomic_write

    path = Path(path)
    line = (json.dumps(row, default=_json_default, allow_nan=False, separators=(",", ":")) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(path.name + ".lock")):
        old = path.read_bytes() if path.exists() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        atomic_write(path, lambda f: f.write(old + line))
    return path


@contextmanager
def _locked(lock_path: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive lock: fcntl.flock on POSIX, else a lock file created with O_EXCL."""
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    if fcntl is None:
        with _exclusive_file(lock_path, timeout):
            yield
        return
    with open(lock_path, "a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not lock {lock_path} in {timeout:.0f} s; another writer holds it "
                                       "(delete the file if no ddlib process is running)") from None
                time.sleep(0.01)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _exclusive_file(lock_path: Path, timeout: float) -> Iterator[None]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not lock {lock_path} in {timeout:.0f} s; delete it if no ddlib process "
                                   "is running") from None
            time.sleep(0.01)
    try:
        yield
    finally:
        os.close(fd)
        lock_path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ reading rows
def read_rows(path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """All rows of the table (an empty list when it does not exist); unreadable lines are reported, skipped."""
    target = results_path(path)
    if target is None or not target.exists():
        return []
    rows, bad = [], 0
    for line in target.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    if bad:
        print(f"warning: skipped {bad} unreadable line(s) in {target}", file=sys.stderr)
    return rows


_FIELDS = ("method", "dataset", "ipc", "model", "protocol", "eval_epochs", "iterations", "seed", "num_eval",
           "accuracy_mean", "accuracy_std", "random_accuracy_mean", "random_accuracy_std", "distill_seconds",
           "train_seconds_mean", "peak_memory_bytes", "notebook", "status", "seconds")


def runs_frame(rows: Iterable[dict[str, Any]]):
    """A pandas DataFrame with one line per row: the metrics' main fields plus source, time, code and machine.
    Rows of smoke runs (``params["smoke"]``: fixture data, tiny settings) are left out."""
    import pandas as pd

    records = []
    for i, row in enumerate(rows):
        if (row.get("params") or {}).get("smoke"):
            continue
        m = row.get("metrics", {})
        rec = {k: m.get(k) for k in _FIELDS}
        rec.update(row=i, source=row.get("source"), timestamp=row.get("timestamp"),
                   commit=(row.get("code") or {}).get("commit"),
                   accuracies=m.get("accuracies") or _single(m, "accuracy"),
                   random_accuracies=m.get("random_accuracies") or _single(m, "random_accuracy"),
                   history=m.get("history"))
        records.append(rec)
    return pd.DataFrame.from_records(records, columns=[*_FIELDS, "row", "source", "timestamp", "commit",
                                                       "accuracies", "random_accuracies", "history"])


def _single(metrics: dict[str, Any], prefix: str) -> list[float]:
    value = metrics.get(f"{prefix}_mean")
    return [] if value is None else [value]


# ------------------------------------------------------------------------------------------ the leaderboard
LEADERBOARD_KEYS = ("dataset", "ipc", "method", "model", "protocol")


def leaderboard(rows: Iterable[dict[str, Any]]):
    """Method × dataset × IPC (and evaluation model and protocol): accuracy mean ± std in %, pooled over all
    evaluation networks of all runs (the DC/DSA/DM convention), the random subset the same way, the published
    number, mean distillation and training seconds, and the largest peak memory."""
    import pandas as pd

    df = runs_frame(rows)
    df = df[df["method"].notna() & df["accuracy_mean"].notna()].copy()
    if df.empty:
        return pd.DataFrame(columns=_BOARD_COLUMNS)
    df["protocol"] = [_protocol_label(p, e) for p, e in zip(df["protocol"], df["eval_epochs"])]
    df["ipc_key"] = df["ipc"].map(lambda v: -1 if v is None or _isnan(v) else int(v))
    out = [_board_line(key, group) for key, group in
           df.groupby(["dataset", "ipc_key", "method", "model", "protocol"], dropna=False, sort=True)]
    return pd.DataFrame(out, columns=_BOARD_COLUMNS)


_BOARD_COLUMNS = ["dataset", "ipc", "method", "model", "protocol", "runs", "nets", "accuracy", "std",
                  "random", "random_std", "published", "published_std", "published_source", "distill_s", "train_s",
                  "memory_mib", "seeds"]


def _board_line(key: tuple, group) -> dict[str, Any]:
    dataset, ipc_key, method, model, protocol = key
    ipc = None if ipc_key == -1 else int(ipc_key)
    accs = [a for lst in group["accuracies"] for a in lst]
    rand = [a for lst in group["random_accuracies"] for a in lst]
    pub = published_accuracy(dataset, method, ipc)
    mem = group["peak_memory_bytes"].dropna()
    return {"dataset": dataset, "ipc": ipc, "method": method, "model": model, "protocol": protocol,
            "runs": len(group), "nets": len(accs), "accuracy": 100 * _mean(accs), "std": 100 * _std(accs),
            "random": 100 * _mean(rand) if rand else None, "random_std": 100 * _std(rand) if rand else None,
            "published": pub.mean if pub else None, "published_std": pub.std if pub else None,
            "published_source": pub.source if pub else None,
            "distill_s": _nanmean(group["distill_seconds"]), "train_s": _nanmean(group["train_seconds_mean"]),
            "memory_mib": float(mem.max()) / 2**20 if len(mem) else None,
            "seeds": sorted({int(s) for s in group["seed"].dropna()})}


def _protocol_label(protocol: Any, epochs: Any) -> str:
    if protocol is None or _isnan(protocol):
        return "?"
    return f"{protocol}/{int(epochs)}ep" if epochs is not None and not _isnan(epochs) else str(protocol)


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _std(values: Sequence[float]) -> float:
    """Population std (numpy's default, which the CLI's accuracy_std uses)."""
    if not values:
        return float("nan")
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def _nanmean(series) -> float | None:
    values = series.dropna()
    return float(values.mean()) if len(values) else None


# ------------------------------------------------------------------------------------------ formatting
def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or _isnan(value):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _pm(mean: Any, std: Any) -> str:
    if mean is None or _isnan(mean):
        return "–"
    return f"{mean:.2f} ± {std:.2f}" if std is not None and not _isnan(std) else f"{mean:.2f}"


def display_rows(board) -> tuple[list[str], list[list[str]]]:
    """Headers and string cells of a leaderboard, as printed, in Markdown and in LaTeX."""
    headers = ["dataset", "IPC", "method", "model", "protocol", "runs", "nets", "accuracy %", "random subset %",
               "published %", "distill s", "train s", "memory MiB"]
    cells = []
    for r in board.to_dict("records"):
        ipc = "full" if r["ipc"] is None or _isnan(r["ipc"]) else str(int(r["ipc"]))
        cells.append([str(r["dataset"]), ipc, str(r["method"]), str(r["model"]), str(r["protocol"]),
                      str(r["runs"]), str(r["nets"]), _pm(r["accuracy"], r["std"]),
                      _pm(r["random"], r["random_std"]), _pm(r["published"], r["published_std"]),
                      _fmt(r["distill_s"], 0), _fmt(r["train_s"], 1), _fmt(r["memory_mib"], 0)])
    return headers, cells


def format_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A plain aligned text table."""
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"
    return "\n".join([line(headers), "|" + "---|" * len(headers), *(line(row) for row in cells)])


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$",
                  "–": "--", "§": r"\S{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def latex_table(headers: Sequence[str], cells: Sequence[Sequence[str]], caption: str = "", label: str = "") -> str:
    """A booktabs table (needs \\usepackage{booktabs}); ``table*`` so it spans both IEEE columns."""
    spec = "l" * len(headers)
    body = [" & ".join(latex_escape(c) for c in row) + r" \\" for row in cells]
    lines = [r"\begin{table*}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(latex_escape(h) for h in headers) + r" \\", r"\midrule", *body, r"\bottomrule",
             r"\end{tabular}"]
    if caption:
        lines.append(rf"\caption{{{latex_escape(caption)}}}")
    if label:
        lines.append(rf"\label{{{label}}}")
    lines.append(r"\end{table*}")
    return "\n".join(lines)


def published_cells(dataset: str | None = None) -> tuple[list[str], list[list[str]]]:
    """The published numbers as table cells (optionally one dataset)."""
    headers = ["dataset", "method", "IPC", "accuracy %", "source"]
    cells = [[p.dataset, p.method, "full" if p.ipc is None else str(p.ipc), _pm(p.mean, p.std), p.source]
             for p in PUBLISHED if dataset in (None, p.dataset)]
    return headers, cells


# ------------------------------------------------------------------------------------------ figures
def plot_all(rows: Sequence[dict[str, Any]], out: str | os.PathLike, *, dpi: int = 100) -> list[Path]:
    """Accuracy vs IPC, vs iteration and vs distillation wall time (PNG, ``dpi`` ≤ 100); figures with no
    data are skipped with a message. Returns the files written."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    df = runs_frame(rows)
    df = df[df["method"].notna() & df["accuracy_mean"].notna()].copy()
    df["accuracy"] = 100 * df["accuracy_mean"].astype(float)
    out = Path(out)
    written = []
    for name, draw in (("accuracy_vs_ipc", _plot_ipc), ("accuracy_vs_iteration", _plot_iteration),
                       ("accuracy_vs_time", _plot_time)):
        fig = draw(df)
        if fig is None:
            print(f"{name}: no runs with the fields it needs; skipped")
            continue
        import matplotlib.pyplot as plt

        from ddlib.plots import save_figure

        written.append(save_figure(fig, out / f"{name}.png", dpi=min(dpi, 100)))
        plt.close(fig)
    return written


def _facet_lines(df, x: str, xlabel: str, logx: bool = False):
    import matplotlib.pyplot as plt
    import seaborn as sns

    datasets = sorted(df["dataset"].dropna().unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        part = df[df["dataset"] == dataset]
        sns.lineplot(data=part, x=x, y="accuracy", hue="method", marker="o", errorbar="sd", ax=ax)
        ax.set(title=dataset, xlabel=xlabel, ylabel="test accuracy (%)")
        if logx:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    return fig


def _plot_ipc(df):
    part = df[df["ipc"].notna()].copy()
    if part.empty:
        return None
    part["ipc"] = part["ipc"].astype(int)
    return _facet_lines(part, "ipc", "images per class", logx=part["ipc"].nunique() > 2)


def _plot_iteration(df):
    """Points from rows with their iteration count, plus curves from a row's history when it holds accuracy."""
    import pandas as pd

    points = df[df["iterations"].notna()][["dataset", "method", "iterations", "accuracy"]]
    curves = []
    for _, r in df.iterrows():
        h = r["history"] or {}
        if isinstance(h, dict) and h.get("accuracy") and len(h.get("iteration", ())) == len(h["accuracy"]):
            acc = [100 * a if a <= 1 else a for a in h["accuracy"]]
            curves.append(pd.DataFrame({"dataset": r["dataset"], "method": r["method"], "iterations": h["iteration"],
                                        "accuracy": acc}))
    data = pd.concat([points, *curves], ignore_index=True)
    if data.empty or data["iterations"].nunique() < 2:
        return None
    data["iterations"] = data["iterations"].astype(float)
    return _facet_lines(data, "iterations", "distillation iterations")


def _plot_time(df):
    import matplotlib.pyplot as plt
    import seaborn as sns

    part = df[df["distill_seconds"].notna()].copy()
    if part.empty:
        return None
    part["ipc"] = part["ipc"].astype(float)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    sns.scatterplot(data=part, x="distill_seconds", y="accuracy", hue="method", style="dataset", size="ipc", ax=ax)
    ax.set(xlabel="distillation wall time (s)", ylabel="test accuracy (%)")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    return fig
