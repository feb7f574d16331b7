"""The course report: per-task tables (Markdown and LaTeX), the figures and a filled ML Reproducibility
Checklist, assembled from the runs table and the executed notebooks' status files.

``build_report(out)`` writes ``out/report.md``, ``out/report.tex`` (a fragment to ``\\input`` into the IEEE
report; needs ``booktabs``) and ``out/figures/*.png``. Every checklist item is drawn from the rows'
metadata; an item the rows cannot support says "missing", so gaps show instead of being papered over.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ddlib import results as res

__all__ = ["Task", "TASKS", "ChecklistItem", "checklist", "notebook_statuses", "build_report", "MISSING"]

MISSING = "missing"


@dataclass(frozen=True)
class Task:
    title: str                  # section heading
    methods: tuple[str, ...]    # methods whose runs belong to the task
    asks: str                   # what the assignment asks, in one line


TASKS = (
    Task("Task 1: DataDAM (attention matching)", ("datadam", "full"),
         "full-data upper bound 2(a); DataDAM from real and noise init 2(b)-(e); cross-architecture 3"),
    Task("Task 2: trajectory matching and a second method", ("mtt", "datm", "pad", "dm", "datadam"),
         "PAD (and one non-trajectory method) against DataDAM on the same backbone"),
    Task("Gradient-matching experiments", ("dc", "dsa", "dd"),
         "DC/DSA across matching models, initialisations and the higher-order term; DD's bilevel baseline"),
    Task("Baselines", ("full", "random", "herding", "kcenter"), "the whole training set and coreset selections"),
)


@dataclass(frozen=True)
class ChecklistItem:
    name: str     # checklist item
    value: str    # what the runs say, or MISSING
    hint: str     # how to fill it when missing

    @property
    def missing(self) -> bool:
        return self.value.startswith(MISSING)


# ------------------------------------------------------------------------------------------ inputs
def notebook_statuses(folder: str | os.PathLike | None) -> list[dict[str, Any]]:
    """The ``*.status.json`` files of an executed-notebooks folder (sorted by name)."""
    if folder is None or not Path(folder).exists():
        return []
    out = []
    for path in sorted(Path(folder).glob("*.status.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def _metric_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if (r.get("metrics") or {}).get("accuracy_mean") is not None]


def _distinct(values) -> list[str]:
    return sorted({str(v) for v in values if v not in (None, "", [])})


# ------------------------------------------------------------------------------------------ checklist
def checklist(rows: Sequence[dict[str, Any]], statuses: Sequence[dict[str, Any]] = ()) -> list[ChecklistItem]:
    """The ML Reproducibility Checklist's experimental items, filled from the runs' metadata."""
    runs = _metric_rows(rows)
    board = res.leaderboard(rows)
    return [
        _item("Code version", _code(rows), "run from a git checkout so each row records its commit"),
        _item("Random seeds", _seeds(runs), "record the seed in each run's metrics (the CLI does)"),
        _item("Number of runs", _counts(board), "record runs with accuracies"),
        _item("Error bars", _error_bars(board), "evaluate at least two networks per setting (--num-eval)"),
        _item("Hyperparameters", _hyperparameters(runs), "record the method config or the parameters"),
        _item("Evaluation protocol", _protocols(runs), "record protocol and eval_epochs in the metrics"),
        _item("Datasets", _datasets(runs), "record the dataset of each run"),
        _item("Hardware", _hardware(rows), "record ddlib.utils.environment() as the row's machine"),
        _item("Software versions", _software(rows), "record ddlib.utils.environment() as the row's machine"),
        _item("Compute time", _compute(runs, statuses), "record distill_seconds / train_seconds_mean"),
        _item("Memory", _memory(runs), "record peak_memory_bytes"),
        ChecklistItem("Description of the algorithms and their assumptions", f"{MISSING} (write it in the report)",
                      "the runs cannot supply this"),
        ChecklistItem("Data preprocessing and excluded data", f"{MISSING} (write it in the report)",
                      "state normalisation, resolution and splits"),
    ]


def _item(name: str, value: str | None, hint: str) -> ChecklistItem:
    return ChecklistItem(name, value or MISSING, hint)


def _machines(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r.get("machine") or {} for r in rows]


def _code(rows) -> str | None:
    codes = [r.get("code") or {} for r in rows]
    commits = _distinct(c.get("commit") for c in codes)
    if not commits:
        return None
    dirty = sum(1 for c in codes if c.get("dirty"))
    hashes = _distinct(c.get("source_hash") for c in codes)
    text = f"commit(s) {', '.join(commits)}; ddlib source hash(es) {', '.join(hashes)}"
    return text + (f"; {dirty} row(s) ran with uncommitted changes to ddlib" if dirty else "; no uncommitted changes")


def _seeds(runs) -> str | None:
    seeds = _distinct((r["metrics"]).get("seed") for r in runs)
    return f"seeds {', '.join(seeds)} (each seeds every random draw of its run)" if seeds else None


def _counts(board) -> str | None:
    if board.empty:
        return None
    return (f"{len(board)} setting(s); {board['runs'].min()}-{board['runs'].max()} run(s) per setting; "
            f"{board['nets'].min()}-{board['nets'].max()} evaluation network(s) per setting")


def _error_bars(board) -> str | None:
    if board.empty or board["nets"].max() < 2:
        return None
    single = int((board["nets"] < 2).sum())
    text = "mean ± std (population) over all evaluation networks of all runs of a setting"
    return text + (f"; {single} setting(s) have a single network and no error bar" if single else "")


def _hyperparameters(runs) -> str | None:
    parts = []
    for method in _distinct(r["metrics"].get("method") for r in runs):
        configs = _distinct(json.dumps(r["metrics"].get("config") or _short_params(r), sort_keys=True)
                            for r in runs if r["metrics"].get("method") == method)
        configs = [c for c in configs if c != "{}"]
        parts.append(f"{method}: " + (" | ".join(configs) if configs else MISSING))
    return "; ".join(parts) or None


def _short_params(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("ipc", "iterations", "init", "batch_real", "lr_img", "model", "preset", "profile")
    return {k: v for k, v in (row.get("params") or {}).items() if k in keep and v is not None}


def _protocols(runs) -> str | None:
    labels = _distinct(f"{r['metrics'].get('protocol')}, {r['metrics'].get('eval_epochs')} epochs, "
                       f"model {r['metrics'].get('model')}" for r in runs if r["metrics"].get("protocol"))
    return "; ".join(labels) or None


def _datasets(runs) -> str | None:
    names = _distinct(r["metrics"].get("dataset") for r in runs)
    return f"{', '.join(names)} (official train/test splits, as loaded by ddlib.data)" if names else None


def _hardware(rows) -> str | None:
    machines = _machines(rows)
    cpus = _distinct(m.get("processor") for m in machines)
    gpus = _distinct(m.get("cuda") for m in machines)
    threads = _distinct(m.get("threads") for m in machines)
    if not cpus and not gpus:
        return None
    return f"CPU {', '.join(cpus) or MISSING}; GPU {', '.join(gpus) or 'none'}; torch threads {', '.join(threads)}"


def _software(rows) -> str | None:
    machines = _machines(rows)
    fields = [(k, _distinct(m.get(k) for m in machines)) for k in ("python", "torch", "ddlib", "platform")]
    if not any(v for _, v in fields):
        return None
    return "; ".join(f"{k} {', '.join(v) or MISSING}" for k, v in fields)


def _compute(runs, statuses) -> str | None:
    distill = sum(r["metrics"].get("distill_seconds") or 0 for r in runs)
    train = sum((r["metrics"].get("train_seconds_mean") or 0) * (r["metrics"].get("num_eval") or 1) for r in runs)
    notebooks = sum(s.get("seconds") or 0 for s in statuses)
    if not (distill or train or notebooks):
        return None
    return (f"distillation {distill / 3600:.2f} h, evaluation training {train / 3600:.2f} h (recorded runs); "
            f"executed notebooks {notebooks / 3600:.2f} h")


def _memory(runs) -> str | None:
    peaks = [r["metrics"].get("peak_memory_bytes") for r in runs if r["metrics"].get("peak_memory_bytes")]
    return f"peak {max(peaks) / 2**20:.0f} MiB (largest recorded)" if peaks else None


# ------------------------------------------------------------------------------------------ rendering
def _task_cells(board, task: Task):
    part = board[board["method"].isin(task.methods)] if not board.empty else board
    return res.display_rows(part)


def _notebook_cells(statuses) -> tuple[list[str], list[list[str]]]:
    headers = ["run", "profile", "status", "seconds", "error"]
    cells = [[s.get("name", "?"), s.get("profile", ""), s.get("status", ""),
              "" if s.get("seconds") is None else f"{s['seconds']:.0f}", s.get("error") or s.get("reason") or ""]
             for s in statuses]
    return headers, cells


def render_markdown(board, items, statuses, figures: Sequence[Path], out: Path) -> str:
    lines = ["# Results and reproducibility", "",
             "Generated by `python -m ddlib report` from the runs table and the executed notebooks. Accuracies are "
             "test accuracy in %, mean ± std over all evaluation networks of all runs; published numbers from "
             "reference/algorithms.md §9 (ConvNet).", ""]
    for task in TASKS:
        headers, cells = _task_cells(board, task)
        lines += [f"## {task.title}", "", f"_{task.asks}_", ""]
        lines += [res.markdown_table(headers, cells) if cells else f"No runs recorded for this task ({MISSING}).", ""]
    lines += ["## Figures", ""]
    lines += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in figures] or [f"No figures ({MISSING})."]
    headers, cells = _notebook_cells(statuses)
    lines += ["", "## Executed notebooks", "",
              res.markdown_table(headers, cells) if cells else f"No executed notebooks found ({MISSING}).", ""]
    lines += ["## ML Reproducibility Checklist", ""]
    for item in items:
        mark = " " if item.missing else "x"
        hint = f" ({item.hint})" if item.missing else ""
        lines.append(f"- [{mark}] **{item.name}**: {item.value}{hint}")
    return "\n".join(lines) + "\n"


def render_latex(board, items, statuses, figures: Sequence[Path], out: Path) -> str:
    esc = res.latex_escape
    parts = ["% Generated by `python -m ddlib report`; needs \\usepackage{booktabs,graphicx}"]
    for i, task in enumerate(TASKS):
        headers, cells = _task_cells(board, task)
        parts.append(res.latex_table(headers, cells, caption=f"{task.title}: {task.asks}", label=f"tab:task{i}")
                     if cells else f"% {task.title}: no runs recorded ({MISSING})")
    for p in figures:
        parts.append("\n".join([r"\begin{figure}[t]", r"\centering",
                                rf"\includegraphics[width=\linewidth]{{{p.relative_to(out).as_posix()}}}",
                                rf"\caption{{{esc(p.stem.replace('_', ' '))}}}", r"\end{figure}"]))
    headers, cells = _notebook_cells(statuses)
    if cells:
        parts.append(res.latex_table(headers, cells, caption="Executed notebooks", label="tab:notebooks"))
    items_tex = [rf"\item \textbf{{{esc(i.name)}}}: {esc(i.value)}" for i in items]
    parts.append("\n".join([r"\section*{ML Reproducibility Checklist}", r"\begin{itemize}", *items_tex,
                            r"\end{itemize}"]))
    return "\n\n".join(parts) + "\n"


def build_report(out: str | os.PathLike, *, results: str | os.PathLike | None = None,
                 notebooks: str | os.PathLike | None = None) -> list[Path]:
    """Write report.md, report.tex and figures/ under ``out``; return the files written."""
    from ddlib.io import atomic_write

    out = Path(out)
    rows = res.read_rows(results)
    statuses = notebook_statuses(notebooks)
    board = res.leaderboard(rows)
    figures = res.plot_all(rows, out / "figures") if rows else []
    items = checklist(rows, statuses)
    written = []
    for name, render in (("report.md", render_markdown), ("report.tex", render_latex)):
        text = render(board, items, statuses, figures, out)
        written.append(atomic_write(out / name, lambda f, t=text: f.write(t), mode="w"))
    return [*written, *figures]
