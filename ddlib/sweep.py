"""Sweeps across runs: method x IPC x seed on this machine (``--backend local``) or on a Ray cluster.

    python -m ddlib sweep --method dm,datadam --ipc 1,10,50 --seed 0,1,2 --backend ray --address HOST:6379

Each run is one ``ddlib distill`` in its own folder ``<out>/<name>/`` (synset.pt, metrics.json). Under Ray
each run is a task that asks for ``--cpus-per-run``/``--gpus-per-run``; the task returns its metrics and the
driver appends the row to the runs table (``ddlib.results.record``), so a table on the driver's disk gets
every row exactly once, whichever machine ran it. A run that fails (an error, or its worker or machine
dying) is submitted once more, then reported. ``notebooks run --backend ray`` sends notebooks the same way.
Ray is imported only with ``--backend ray`` (``pip install "ddlib[ray]"``).
"""
from __future__ import annotations

import itertools
import json
import os
import socket
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["SweepConfig", "SweepRun", "plan_sweep", "run_sweep", "run_distill", "run_notebooks_ray", "BACKENDS"]

BACKENDS = ("local", "ray")


@dataclass
class SweepConfig:
    """One sweep: the grid, the shared flags, and where and how the runs execute."""

    methods: list[str]                      # distillation methods (`ddlib methods`)
    ipcs: list[int]                         # images per class
    seeds: list[int]                        # seeds
    dataset: str = "digits"                 # dataset of every run
    iterations: int | None = None           # iterations of every run (None: the method's default)
    extra: list[str] = field(default_factory=list)  # further `ddlib distill` flags for every run
    out: Path = Path("runs/sweep")          # one folder per run: <out>/<name>/
    results: str | None = None              # runs table (None: $DDLIB_RESULTS, else results/runs.jsonl)
    backend: str = "local"                  # local | ray
    address: str | None = None              # Ray cluster (None: $RAY_ADDRESS, else a Ray started here)
    jobs: int = 1                           # local backend: runs at once (each gets cores // jobs threads)
    cpus: float = 1.0                       # CPUs per run (a Ray task's num_cpus)
    gpus: float = 0.0                       # GPUs per run (a Ray task's num_gpus)
    retries: int = 1                        # a failed run is submitted this many more times, then reported


@dataclass
class SweepRun:
    name: str                               # folder and row source: <method>_<dataset>_ipc<N>_seed<S>
    argv: list[str]                         # `ddlib distill` arguments
    params: dict[str, Any]                  # what the runs table records as the run's parameters


def plan_sweep(cfg: SweepConfig) -> list[SweepRun]:
    """Every (method, ipc, seed) of the grid as a run, in that order."""
    if cfg.backend not in BACKENDS:
        raise ValueError(f"unknown backend {cfg.backend!r}; use {' or '.join(BACKENDS)}")
    if not (cfg.methods and cfg.ipcs and cfg.seeds):
        raise ValueError("a sweep needs at least one --method, --ipc and --seed")
    if cfg.jobs < 1:
        raise ValueError(f"jobs ({cfg.jobs}) must be at least 1")
    runs = []
    for method, ipc, seed in itertools.product(cfg.methods, cfg.ipcs, cfg.seeds):
        name = f"{method}_{cfg.dataset}_ipc{ipc}_seed{seed}"
        argv = ["--method", method, "--dataset", cfg.dataset, "--ipc", str(ipc), "--seed", str(seed),
                "--out", str((cfg.out / name).resolve())]
        if cfg.iterations is not None:
            argv += ["--iterations", str(cfg.iterations)]
        params = {"method": method, "dataset": cfg.dataset, "ipc": ipc, "seed": seed,
                  "iterations": cfg.iterations, "extra": list(cfg.extra), "sweep": str(cfg.out)}
        runs.append(SweepRun(name, argv + list(cfg.extra), params))
    return runs


def run_distill(argv: Sequence[str], attempt: int = 0, threads: int = 0) -> dict[str, Any]:
    """One run (in a worker): ``ddlib distill argv`` without recording; its metrics, where and which attempt."""
    import torch

    from ddlib.cli import main

    if threads:
        torch.set_num_threads(threads)
    out = Path(argv[argv.index("--out") + 1])
    (out / "metrics.json").unlink(missing_ok=True)  # a retried run must not return the failed attempt's file
    code = main(["distill", *argv, "--results", "off", "--force"])
    if code != 0 or not (out / "metrics.json").exists():
        raise RuntimeError(f"ddlib distill {' '.join(argv)} exited with status {code}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {**metrics, "attempt": attempt, "host": socket.gethostname(), "pid": os.getpid()}


# ------------------------------------------------------------------------------------------ driving
Submit = Callable[[Any, int], Any]
Collect = Callable[[dict], tuple[Any, Any, BaseException | None]]


def _drive(items: Sequence[Any], submit: Submit, collect: Collect, retries: int, name: Callable[[Any], str],
           done: Callable[[Any, Any], dict], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Submit every item, collect results as they finish, resubmit a failure up to ``retries`` times."""
    pending = {submit(item, 0): (item, 0) for item in items}
    statuses: dict[str, dict[str, Any]] = {}
    while pending:
        handle, result, error = collect(pending)
        item, attempt = pending.pop(handle)
        if error is None:
            statuses[name(item)] = done(item, result)
        elif attempt < retries:
            log(f"  retrying {name(item)} (attempt {attempt + 1} failed: {_short(error)})")
            pending[submit(item, attempt + 1)] = (item, attempt + 1)
        else:
            log(f"  failed   {name(item)} after {attempt + 1} attempt(s): {_short(error)}")
            statuses[name(item)] = {"name": name(item), "status": "failed", "error": _short(error),
                                    "attempts": attempt + 1}
    return [statuses[name(item)] for item in items]


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text[-300:]}"


def run_sweep(cfg: SweepConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the sweep; every finished run is one row in the runs table. Returns one status per run."""
    from ddlib.results import record

    runs = plan_sweep(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)

    def done(run: SweepRun, metrics: dict[str, Any]) -> dict[str, Any]:
        record(metrics, run.params, source=f"sweep:{run.name}", path=cfg.results)
        log(f"  ok       {run.name}: accuracy {metrics.get('accuracy_mean')} (attempt {metrics['attempt'] + 1}, "
            f"{metrics['host']})")
        return {"name": run.name, "status": "ok", "attempts": metrics["attempt"] + 1, "metrics": metrics}

    log(f"{len(runs)} run(s) on {cfg.backend}, into {cfg.out}")
    drive = _drive_ray if cfg.backend == "ray" else _drive_local
    return drive(runs, cfg, done, log)


def _drive_local(runs: list[SweepRun], cfg: SweepConfig, done, log) -> list[dict[str, Any]]:
    """Runs in a pool of ``cfg.jobs`` fresh processes on this machine (no Ray)."""
    jobs = min(cfg.jobs, len(runs))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        def submit(run: SweepRun, attempt: int) -> Future:
            return pool.submit(run_distill, run.argv, attempt, threads)

        def collect(pending: dict) -> tuple[Any, Any, BaseException | None]:
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            future = next(iter(finished))
            error = future.exception()
            return future, None if error else future.result(), error

        return _drive(runs, submit, collect, cfg.retries, lambda r: r.name, done, log)


def _ray(address: str | None):
    """Ray, connected to ``address`` (or $RAY_ADDRESS, or a Ray started on this machine)."""
    try:
        import ray
    except ImportError:
        raise ValueError('--backend ray needs Ray: pip install "ddlib[ray]" (or pip install "ray[default]")') from None
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, log_to_driver=False,
                 include_dashboard=False if not (address or os.environ.get("RAY_ADDRESS")) else None)
    return ray


def _ray_collect(ray):
    def collect(pending: dict) -> tuple[Any, Any, BaseException | None]:
        ready, _ = ray.wait(list(pending), num_returns=1)
        try:
            return ready[0], ray.get(ready[0]), None
        except Exception as exc:  # noqa: BLE001 -- a task's error, or its worker or node dying
            return ready[0], None, exc
    return collect


def _drive_ray(runs: list[SweepRun], cfg: SweepConfig, done, log) -> list[dict[str, Any]]:
    """Each run a Ray task with ``cfg.cpus`` CPUs and ``cfg.gpus`` GPUs; Ray's own retries are off (ours count)."""
    ray = _ray(cfg.address)
    task = ray.remote(max_retries=0)(run_distill).options(num_cpus=cfg.cpus, num_gpus=cfg.gpus)
    log(f"Ray cluster: {ray.cluster_resources()}")

    def submit(run: SweepRun, attempt: int):
        return task.remote(run.argv, attempt, max(1, int(cfg.cpus)))

    return _drive(runs, submit, _ray_collect(ray), cfg.retries, lambda r: r.name, done, log)


# ------------------------------------------------------------------------------------------ notebooks
def _notebook_task(run, cfg, threads: int, gpu: bool) -> dict[str, Any]:
    """One notebook on a Ray worker: the runner's own ``_run_one`` (papermill, status file, runs-table row)."""
    from ddlib import notebooks as nbr

    if run.profile == "smoke" and run.params.get("data_root") is None:
        run.env.update(nbr._smoke_env([run], print))  # the fixtures of the machine the task runs on
    return nbr._run_one(run, cfg, threads, gpu, nbr._Live())


def run_notebooks_ray(runs: Sequence[Any], cfg: Any, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """``notebooks run --backend ray``: each notebook run a Ray task (``cfg.cpus_per_run`` CPUs, a GPU for the
    GPU-only ones when the cluster has one), retried once when the task itself fails. ``--out`` and the runs
    table must be on storage every machine sees (the kernels write them)."""
    ray = _ray(cfg.address)
    cfg.out.mkdir(parents=True, exist_ok=True)
    gpu = ray.cluster_resources().get("GPU", 0) > 0
    threads = max(1, int(cfg.cpus_per_run))
    task = ray.remote(max_retries=0)(_notebook_task)
    log(f"{len(runs)} run(s), profile {cfg.profile}, as Ray tasks of {threads} CPU(s), into {cfg.out}")

    def submit(run, attempt: int):
        needs = 1 if run.gpu_only and gpu else 0
        return task.options(num_cpus=threads, num_gpus=needs).remote(run, cfg, threads, gpu)

    def done(run, status: dict[str, Any]) -> dict[str, Any]:
        from ddlib.notebooks import _status_line

        log(_status_line(status))
        return status

    return _drive(runs, submit, _ray_collect(ray), 1, lambda r: r.name, done, log)
