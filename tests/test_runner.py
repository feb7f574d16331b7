"""The papermill batch runner on tiny generated notebooks: parallelism, failure isolation, skip-when-unchanged,
sweeps, parameter validation, profiles and the GPU skip."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from ddlib import notebooks as nbr
from ddlib.cli import main

PARAMS = 'smoke = False\nseed = 0\ndata_root = None\nvalue = 1\nresults_dir = "unused"\n'

# Both notebooks wait for each other: run one after the other, the first would time out and fail.
RENDEZVOUS = """
import time
from pathlib import Path
here = Path(results_dir); here.mkdir(parents=True, exist_ok=True)
meet = here.parent / "meet"; meet.mkdir(exist_ok=True)
(meet / here.name).touch()
deadline = time.time() + 90
while len(list(meet.iterdir())) < 2 and time.time() < deadline:
    time.sleep(0.1)
assert len(list(meet.iterdir())) >= 2, "the other notebook never ran at the same time"
"""

WORK = """
from pathlib import Path
import os
Path(results_dir).mkdir(parents=True, exist_ok=True)
with open(Path(results_dir).parent / "executions.txt", "a") as f:
    f.write(f"{value}\\n")
(Path(results_dir) / "value.txt").write_text(f"{value} {seed} {smoke} {os.environ.get('OMP_NUM_THREADS')}")
from ddlib.results import record
record({"method": "toy", "dataset": "digits", "ipc": value, "accuracy_mean": value / 10, "seed": seed},
       {"value": value})
"""

FAIL = 'raise RuntimeError("boom on purpose")'


def make_notebook(path: Path, *body: str, params: str = PARAMS, gpu: bool = False) -> Path:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, *(nbformat.v4.new_code_cell(b) for b in body)]
    nb.metadata["ddlib"] = {"requires_gpu": gpu}
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def statuses_by_notebook(statuses):
    return {Path(s["notebook"]).stem: s for s in statuses}


@pytest.fixture
def fixed_sources(monkeypatch):
    """Other work may edit ddlib while the tests run; the skip decision must see one source version."""
    import ddlib.results

    monkeypatch.setattr(ddlib.results, "source_hash", lambda folder=None: "sources-v1")
    return monkeypatch


def test_parallel_runs_isolate_a_failure_and_skip_when_unchanged(tmp_path, fixed_sources):
    folder = tmp_path / "nbs"
    good = make_notebook(folder / "01_good.ipynb", RENDEZVOUS, WORK)
    bad = make_notebook(folder / "02_bad.ipynb", RENDEZVOUS, FAIL)
    out, table = tmp_path / "out", tmp_path / "runs.jsonl"
    cfg = nbr.RunnerConfig(out=out, profile="course", jobs=2, results=table, cores=4)
    runs = nbr.plan([good, bad], cfg)

    first = statuses_by_notebook(nbr.run_all(runs, cfg))
    assert first["01_good"]["status"] == "ok", first["01_good"]
    assert first["02_bad"]["status"] == "failed"
    assert "boom on purpose" in first["02_bad"]["error"]
    assert (out / "01_good-course.ipynb").exists() and not (out / "02_bad-course.ipynb").exists()
    assert (out / "02_bad-course.failed.ipynb").exists() and (out / "02_bad-course.log").exists()
    saved = json.loads((out / "02_bad-course.status.json").read_text())
    assert saved["status"] == "failed" and saved["returncode"] != 0
    # 4 cores // 2 jobs, and the course profile's smoke = False reached the kernel
    assert (out / "01_good-course" / "value.txt").read_text() == "1 0 False 2"
    executed = nbformat.read(str(out / "01_good-course.ipynb"), as_version=4)
    assert "papermill" not in executed.metadata and executed.metadata["ddlib_run"]["profile"] == "course"

    # the notebook's own record() call and the runner's status row reached the table
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    assert any(r["metrics"].get("method") == "toy" and r["source"] == "notebook:01_good-course" for r in rows)
    assert {r["metrics"].get("status") for r in rows if "status" in r["metrics"]} == {"ok", "failed"}

    second = statuses_by_notebook(nbr.run_all(nbr.plan([good, bad], cfg), cfg))
    assert second["01_good"].get("skipped") == "unchanged"
    assert second["02_bad"]["status"] == "failed"  # failures are never skipped
    assert (out / "executions.txt").read_text().split() == ["1"]

    cfg.force = True
    forced = nbr.run_all(nbr.plan([good], cfg), cfg)[0]
    assert forced["status"] == "ok" and "skipped" not in forced
    assert (out / "executions.txt").read_text().split() == ["1", "1"]


def test_changed_notebook_or_sources_rerun(tmp_path, fixed_sources):
    nb = make_notebook(tmp_path / "01_work.ipynb", WORK)
    cfg = nbr.RunnerConfig(out=tmp_path / "out", profile="course", results=tmp_path / "runs.jsonl")
    assert nbr.run_all(nbr.plan([nb], cfg), cfg)[0]["status"] == "ok"
    make_notebook(nb, WORK + "\nprint('edited')")  # same parameters, new code
    again = nbr.run_all(nbr.plan([nb], cfg), cfg)[0]
    assert again["status"] == "ok" and "skipped" not in again
    assert nbr.run_all(nbr.plan([nb], cfg), cfg)[0].get("skipped") == "unchanged"
    import ddlib.results

    fixed_sources.setattr(ddlib.results, "source_hash", lambda folder=None: "sources-v2")  # ddlib edited
    assert "skipped" not in nbr.run_all(nbr.plan([nb], cfg), cfg)[0]
    assert (tmp_path / "out" / "executions.txt").read_text().split() == ["1", "1", "1"]


def test_cli_reports_failure_in_exit_status(tmp_path, capsys):
    folder = tmp_path / "nbs"
    make_notebook(folder / "01_bad.ipynb", FAIL)
    code = main(["notebooks", "run", "01", "--notebooks-dir", str(folder), "--profile", "smoke",
                 "--out", str(tmp_path / "out"), "--results", "off"])
    assert code == 1
    assert "01_bad-smoke" in capsys.readouterr().err


def test_cli_cores_sets_the_kernel_s_threads(tmp_path):
    folder = tmp_path / "nbs"
    make_notebook(folder / "01_work.ipynb", WORK)
    out = tmp_path / "out"
    assert main(["notebooks", "run", "01", "--notebooks-dir", str(folder), "--profile", "course", "--cores", "3",
                 "--out", str(out), "--results", "off"]) == 0
    assert (out / "01_work-course" / "value.txt").read_text() == "1 0 False 3"


@pytest.mark.parametrize("flag, value", [("--cores", "0"), ("--jobs", "0"), ("--jobs", "two"),
                                         ("--cpus-per-run", "0"), ("--cpus-per-run", "nan"),
                                         ("--cpus-per-run", "inf")])
def test_cli_rejects_a_count_below_one(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["notebooks", "run", "01", flag, value])
    assert exc.value.code == 2
    assert f"argument {flag}: must be" in capsys.readouterr().err


def test_runner_config_with_no_cores_is_an_error(tmp_path):
    nb = make_notebook(tmp_path / "01_work.ipynb", WORK)
    cfg = nbr.RunnerConfig(out=tmp_path / "out", profile="smoke", cores=0)
    with pytest.raises(ValueError, match="at least 1"):
        nbr.run_all(nbr.plan([nb], cfg), cfg)


def test_sweep_config_with_no_jobs_is_an_error():
    from ddlib.sweep import SweepConfig, plan_sweep

    with pytest.raises(ValueError, match="at least 1"):
        plan_sweep(SweepConfig(["dm"], [1], [0], jobs=0))


def test_sweep_is_the_cross_product_named_by_parameters(tmp_path):
    nb = make_notebook(tmp_path / "01_work.ipynb", WORK)
    cfg = nbr.RunnerConfig(out=tmp_path / "out", profile="smoke")
    runs = nbr.plan([nb], cfg, overrides=[("value", "1,10,50"), ("seed", "0,1")])
    assert len(runs) == 6
    names = {r.name for r in runs}
    assert "01_work-smoke__value-10_seed-1" in names and len(names) == 6
    assert {(r.params["value"], r.params["seed"]) for r in runs} == {(v, s) for v in (1, 10, 50) for s in (0, 1)}
    assert all(r.params["smoke"] is True for r in runs)
    assert runs[0].params["results_dir"] == str((tmp_path / "out" / runs[0].name).resolve())


def test_executed_sweep_writes_one_output_per_point(tmp_path):
    nb = make_notebook(tmp_path / "01_work.ipynb", WORK)
    cfg = nbr.RunnerConfig(out=tmp_path / "out", profile="smoke", jobs=2, results=tmp_path / "runs.jsonl")
    statuses = nbr.run_all(nbr.plan([nb], cfg, overrides=[("value", "2,3")]), cfg)
    assert [s["status"] for s in statuses] == ["ok", "ok"]
    for v in (2, 3):
        assert (tmp_path / "out" / f"01_work-smoke__value-{v}.ipynb").exists()
        assert (tmp_path / "out" / f"01_work-smoke__value-{v}" / "value.txt").read_text().startswith(f"{v} 0 True")


@pytest.mark.parametrize("text, expected", [
    ("1,10,50", [1, 10, 50]), ("[1, 2]", [[1, 2]]), ("None", [None]), ("mnist", ["mnist"]),
    ("true", [True]), ("0.5,1e-3", [0.5, 0.001]), ("a,b", ["a", "b"]),
])
def test_parse_values(text, expected):
    assert nbr.parse_values(text) == expected


def test_unknown_parameter_is_a_clear_error(tmp_path):
    nb = make_notebook(tmp_path / "01_work.ipynb", WORK)
    cfg = nbr.RunnerConfig(out=tmp_path / "out")
    with pytest.raises(ValueError, match="nosuch.*01_work.ipynb does not have.*value"):
        nbr.plan([nb], cfg, overrides=[("nosuch", "1")])
    with pytest.raises(ValueError, match="-f parameters file sets other"):
        nbr.plan([nb], cfg, file_params={"other": 1})
    (tmp_path / "profiles.yaml").write_text("01_work:\n  course: {itterations: 5}\n")
    with pytest.raises(ValueError, match="profile 'course'.*itterations"):
        nbr.plan([nb], nbr.RunnerConfig(out=tmp_path / "out", profile="course"))
    with pytest.raises(ValueError, match="unknown profile 'fast'"):
        nbr.plan([nb], nbr.RunnerConfig(out=tmp_path / "out", profile="fast"))


def test_profile_file_and_flags_take_precedence_in_order(tmp_path):
    nb = make_notebook(tmp_path / "01_work.ipynb", WORK)
    (tmp_path / "profiles.yaml").write_text(
        "defaults:\n  paper: {seed: 7}\n01_work:\n  paper: {value: 100}\n")
    cfg = nbr.RunnerConfig(out=tmp_path / "out", profile="paper")
    assert nbr.plan([nb], cfg)[0].params | {"results_dir": 0} == {
        "smoke": False, "seed": 7, "value": 100, "results_dir": 0}
    run = nbr.plan([nb], cfg, file_params={"value": 5, "seed": 8}, overrides=[("seed", "9")])[0]
    assert (run.params["value"], run.params["seed"]) == (5, 9)
    assert "seed = 7" not in nbr.describe_parameters(nb) and "100" in nbr.describe_parameters(nb)


def test_gpu_notebook_is_skipped_on_a_cpu(tmp_path):
    nb = make_notebook(tmp_path / "01_gpu.ipynb", FAIL, gpu=True)
    cfg = nbr.RunnerConfig(out=tmp_path / "out", gpu_available=False)
    [status] = nbr.run_all(nbr.plan([nb], cfg), cfg)
    assert status["status"] == "skipped" and "needs a GPU" in status["reason"]
    assert not (tmp_path / "out" / "01_gpu-smoke.log").exists()  # nothing was executed


def test_find_notebooks_by_prefix_and_error(tmp_path):
    make_notebook(tmp_path / "01_a.ipynb", WORK)
    make_notebook(tmp_path / "02_b.ipynb", WORK)
    assert [p.name for p in nbr.find_notebooks(["02"], tmp_path)] == ["02_b.ipynb"]
    assert len(nbr.find_notebooks([], tmp_path)) == 2
    with pytest.raises(FileNotFoundError, match="'03' matches no notebook.*01_a"):
        nbr.find_notebooks(["03"], tmp_path)


def test_repository_profiles_match_the_notebooks():
    folder = Path(__file__).parents[1] / "notebooks"
    profiles = nbr.load_profiles(folder)
    for path in nbr.find_notebooks([], folder):
        for profile in nbr.BUILTIN_PROFILES:
            nbr.profile_params(path, profile, profiles)  # raises on a name the notebook lacks


def test_timeout_kills_the_run_and_reports_it(tmp_path):
    nb = make_notebook(tmp_path / "01_slow.ipynb", "import time\ntime.sleep(300)")
    cfg = nbr.RunnerConfig(out=tmp_path / "out", timeout=20)
    [status] = nbr.run_all(nbr.plan([nb], cfg), cfg)
    assert status["status"] == "failed" and "timed out after 20" in status["error"]
    assert status["seconds"] < 120 and not (tmp_path / "out" / "01_slow-smoke.ipynb").exists()


SLEEP = """
import os, time
from pathlib import Path
Path(results_dir).mkdir(parents=True, exist_ok=True)
(Path(results_dir).parent / "kernel.pid").write_text(str(os.getpid()))
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    psutil = pytest.importorskip("psutil")
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigterm_stops_the_notebooks_and_marks_them_interrupted(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    make_notebook(tmp_path / "nbs" / "01_sleep.ipynb", SLEEP)
    out = tmp_path / "out"
    runner = subprocess.Popen([sys.executable, "-m", "ddlib", "notebooks", "run", "01", "--notebooks-dir",
                               str(tmp_path / "nbs"), "--profile", "smoke", "--out", str(out), "--results", "off"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not (out / "kernel.pid").exists():
        assert runner.poll() is None and time.monotonic() < deadline, runner.communicate()[0][-2000:]
        time.sleep(0.2)
    kernel = int((out / "kernel.pid").read_text())
    runner.send_signal(signal.SIGTERM)  # a scheduler stopping the job
    output = runner.communicate(timeout=60)[0]
    assert runner.returncode == 128 + signal.SIGTERM, output
    status = json.loads((out / "01_sleep-smoke.status.json").read_text())
    assert status["status"] == "interrupted", status
    deadline = time.monotonic() + 10
    while _alive(kernel) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(kernel), "the notebook's kernel outlived the runner"


def test_executed_notebooks_embed_their_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")  # as in a test session or a headless shell: not passed to the kernel
    make_notebook(tmp_path / "nbs" / "01_plot.ipynb", "import matplotlib.pyplot as plt\nplt.plot([0, 1])\nplt.show()")
    cfg = nbr.RunnerConfig(out=tmp_path / "out", profile="smoke", results=None)
    [status] = nbr.run_all(nbr.plan([tmp_path / "nbs" / "01_plot.ipynb"], cfg), cfg)
    assert status["status"] == "ok", status
    executed = nbformat.read(status["output"], as_version=4)
    assert any("image/png" in o.get("data", {}) for c in executed.cells for o in c.get("outputs", []))
