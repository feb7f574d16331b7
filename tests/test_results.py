"""The runs table (lock-safe appends), the leaderboard, the figures, the CLI's rows and the report."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ddlib import report, results
from ddlib.cli import main

MACHINE = {"processor": "Test CPU", "cuda": None, "threads": 2, "python": "3.11", "torch": "2.x", "ddlib": "0.1.0",
           "platform": "Linux"}


def row(method, accs, *, dataset="mnist", ipc=10, seed=0, random=None, machine=MACHINE, **extra):
    metrics = {"method": method, "dataset": dataset, "ipc": ipc, "model": "convnet", "protocol": "dc",
               "eval_epochs": 300, "num_eval": len(accs), "accuracies": accs, "accuracy_mean": sum(accs) / len(accs),
               "accuracy_std": 0.0, "distill_seconds": 100.0, "train_seconds_mean": 10.0,
               "peak_memory_bytes": 2**30, "iterations": 200, **extra}
    if seed is not None:
        metrics["seed"] = seed
    if random:
        metrics.update(random_accuracies=random, random_accuracy_mean=sum(random) / len(random))
    r = results.make_row(metrics, {"ipc": ipc}, source="test", machine=machine)
    r["code"] = {"commit": "abc1234", "dirty": False, "source_hash": "f00"}
    return r


@pytest.fixture
def rows():
    return [row("dm", [0.95, 0.96], random=[0.90]), row("dm", [0.97], seed=1, random=[0.92]),
            row("datadam", [0.93, 0.94], iterations=100), row("full", [0.99], ipc=None),
            row("dc", [0.5, 0.6], dataset="digits", ipc=1, history={"iteration": [10, 20], "accuracy": [0.3, 0.5]}),
            results.make_row({"notebook": "01", "status": "ok", "seconds": 5.0}, {}, machine=MACHINE)]


def write_table(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


APPENDER = """
import sys
from ddlib.results import append_row
path, writer = sys.argv[1], int(sys.argv[2])
for i in range(25):
    append_row({"writer": writer, "i": i, "pad": "x" * 3000}, path)
"""


def test_parallel_appends_from_several_processes_lose_nothing(tmp_path):
    table = tmp_path / "runs.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(table), str(w)]) for w in range(4)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    lines = table.read_text().splitlines()
    parsed = [json.loads(line) for line in lines]  # every line whole
    assert sorted((r["writer"], r["i"]) for r in parsed) == [(w, i) for w in range(4) for i in range(25)]


def test_a_half_written_line_is_skipped_and_the_next_row_starts_clean(tmp_path, capsys):
    table = tmp_path / "runs.jsonl"
    table.write_text('{"metrics": {"method": "dm"}}\n{"metrics": {"meth')
    results.append_row({"metrics": {"method": "dc"}}, table)
    got = results.read_rows(table)
    assert [r["metrics"]["method"] for r in got] == ["dm", "dc"]
    assert "skipped 1 unreadable line" in capsys.readouterr().err


def test_results_path_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("DDLIB_RESULTS", str(tmp_path / "env.jsonl"))
    assert results.results_path(tmp_path / "flag.jsonl") == tmp_path / "flag.jsonl"
    assert results.results_path() == tmp_path / "env.jsonl"
    monkeypatch.setenv("DDLIB_RESULTS", "off")
    assert results.results_path() is None
    monkeypatch.delenv("DDLIB_RESULTS")
    assert results.results_path() is None  # under pytest nothing goes to the repository's table


def test_record_keeps_metrics_params_code_and_machine(tmp_path):
    r = results.record({"method": "dm", "accuracy_mean": 0.5, "environment": MACHINE}, {"ipc": 1},
                       source="unit", path=tmp_path / "t.jsonl")
    [saved] = results.read_rows(tmp_path / "t.jsonl")
    assert saved == json.loads(json.dumps(r))
    assert saved["machine"] == MACHINE and "environment" not in saved["metrics"]
    assert saved["params"] == {"ipc": 1} and saved["source"] == "unit"
    assert set(saved["code"]) == {"commit", "dirty", "source_hash"} and saved["timestamp"].endswith("Z")


def test_record_evaluation_gives_a_leaderboard_row_with_its_random_baseline(tmp_path, monkeypatch):
    from ddlib.evaluate import EvalResult

    monkeypatch.setenv("DDLIB_RESULTS", str(tmp_path / "nb.jsonl"))
    protocol = {"name": "dc", "epochs": 300, "lr": 0.01}
    synthetic = EvalResult("convnet", protocol, accuracies=[0.95, 0.97], balanced_accuracies=[0.95, 0.97])
    random = EvalResult("convnet", protocol, accuracies=[0.90], balanced_accuracies=[0.90])
    results.record_evaluation(synthetic, {"ipc": 10, "lr_img": 1.0}, method="datadam", dataset="mnist", ipc=10,
                              seed=0, random=random, source="notebook:01", distill_seconds=12.5)
    [saved] = results.read_rows()
    m = saved["metrics"]
    assert (m["protocol"], m["eval_epochs"], m["distill_seconds"]) == ("dc", 300, 12.5)
    assert m["random_accuracies"] == [0.90] and saved["params"]["lr_img"] == 1.0
    smoke = results.record_evaluation(synthetic, {"smoke": True}, method="datadam", dataset="mnist", ipc=10)
    assert len(results.read_rows()) == 2
    [line] = results.leaderboard([saved, smoke]).to_dict("records")  # smoke runs stay off the leaderboard
    assert (line["method"], line["ipc"], line["protocol"], line["nets"]) == ("datadam", 10, "dc/300ep", 2)
    assert line["accuracy"] == pytest.approx(96.0) and line["random"] == pytest.approx(90.0)


def test_leaderboard_pools_networks_and_shows_published_and_random(rows):
    board = results.leaderboard(rows).set_index("method")
    assert "01" not in board.index and len(board) == 4  # the notebook-status row has no accuracy
    dm = board.loc["dm"]
    assert (dm["runs"], dm["nets"]) == (2, 3)
    assert dm["accuracy"] == pytest.approx(96.0)
    assert dm["std"] == pytest.approx(0.8165, abs=1e-3)  # population std over 95, 96, 97
    assert dm["random"] == pytest.approx(91.0)
    assert (dm["published"], dm["published_std"]) == (97.5, 0.1) and "algorithms.md" in dm["published_source"]
    assert dm["seeds"] == [0, 1] and dm["memory_mib"] == 1024
    assert board.loc["full"]["published"] == 99.6 and math.isnan(board.loc["full"]["ipc"])
    assert math.isnan(board.loc["datadam"]["published"])  # MNIST DataDAM numbers are not published


def test_published_table_holds_the_reference_numbers():
    assert results.published_accuracy("cifar10", "pad", 50).mean == 77.0
    assert results.published_accuracy("mnist", "dc", 1).std == 0.5
    assert results.published_accuracy("mnist", "mtt", 10) is None


def test_results_table_command(tmp_path, rows, capsys):
    table = write_table(tmp_path / "runs.jsonl", rows)
    assert main(["results", "table", "--results", str(table), "--dataset", "mnist"]) == 0
    out = capsys.readouterr().out
    assert "96.00 ± 0.82" in out and "97.50 ± 0.10" in out and "91.00" in out and "digits" not in out
    assert main(["results", "table", "--results", str(table), "--format", "latex"]) == 0
    assert r"\begin{tabular}" in capsys.readouterr().out


def test_plots_are_written(tmp_path, rows):
    paths = results.plot_all(rows, tmp_path / "fig", dpi=300)
    assert sorted(p.name for p in paths) == ["accuracy_vs_ipc.png", "accuracy_vs_iteration.png",
                                             "accuracy_vs_time.png"]
    from PIL import Image

    with Image.open(paths[0]) as im:
        assert max(im.size) < 1500  # dpi capped at 100


def test_cli_run_appends_a_row(tmp_path):
    table = tmp_path / "runs.jsonl"
    assert main(["select", "--method", "random", "--dataset", "digits", "--image-size", "8", "--ipc", "1",
                 "--no-eval", "--results", str(table)]) == 0
    [r] = results.read_rows(table)
    assert r["source"] == "cli:select" and r["metrics"]["method"] == "random" and r["params"]["ipc"] == 1
    assert "torch" in r["machine"] and "environment" not in r["metrics"]


def test_report_builds_tables_figures_and_checklist(tmp_path, rows):
    table = write_table(tmp_path / "runs.jsonl", rows)
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    (nbs / "01-course.status.json").write_text(json.dumps({"name": "01-course", "status": "ok", "seconds": 3600}))
    written = report.build_report(tmp_path / "report", results=table, notebooks=nbs)
    md = (tmp_path / "report" / "report.md").read_text()
    assert {p.name for p in written} >= {"report.md", "report.tex", "accuracy_vs_ipc.png"}
    assert "## Task 1: DataDAM" in md and "| mnist | 10 | datadam |" in md
    assert "![accuracy_vs_ipc](figures/accuracy_vs_ipc.png)" in md and "01-course" in md
    assert "- [x] **Random seeds**: seeds 0, 1" in md and "Test CPU" in md
    assert "executed notebooks 1.00 h" in md
    tex = (tmp_path / "report" / "report.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and r"\section*{ML Reproducibility Checklist}" in tex


def test_checklist_marks_missing_items(rows):
    bare = [row("dm", [0.9], seed=None, machine={})]
    items = {i.name: i for i in report.checklist(bare)}
    assert items["Random seeds"].missing and items["Random seeds"].value == "missing"
    assert items["Hardware"].missing and items["Error bars"].missing  # one network: no error bar
    assert not items["Hyperparameters"].missing
    full = {i.name: i for i in report.checklist(rows)}
    assert not full["Random seeds"].missing and not full["Hardware"].missing and not full["Error bars"].missing
    md = report.render_markdown(results.leaderboard(bare), list(items.values()), [], [], Path("."))
    assert "- [ ] **Random seeds**: missing" in md
    assert "No runs recorded for this task (missing)" in md


def test_import_backfills_metrics_files_once(tmp_path):
    run = tmp_path / "old" / "dm_run"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"method": "dm", "dataset": "digits", "ipc": 1, "seed": 0,
                                                  "accuracy_mean": 0.9, "accuracy_std": 0.01}))
    (tmp_path / "old" / "summary").mkdir()
    (tmp_path / "old" / "summary" / "metrics.json").write_text(json.dumps({"rows": []}))  # not a run: skipped
    table = tmp_path / "runs.jsonl"
    assert main(["results", "import", str(tmp_path / "old"), "--results", str(table)]) == 0
    assert main(["results", "import", str(tmp_path / "old"), "--results", str(table)]) == 0
    rows = results.read_rows(table)
    assert len(rows) == 1 and rows[0]["params"]["method"] == "dm" and rows[0]["source"].startswith("import:")
