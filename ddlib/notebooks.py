"""Batch execution of the numbered notebooks with papermill: profiles, sweeps, skip-when-unchanged.

``python -m ddlib notebooks run [NOTEBOOK ...] --profile smoke|course|paper [-p KEY VALUES] [-f params.yaml]
--out results/notebooks --jobs N`` runs each notebook (or each point of a sweep) in its own papermill
subprocess and writes, per run, into ``--out``:

* ``<name>.ipynb``: the executed notebook (executed into ``.tmp/`` and renamed only on success; a failed
  run leaves ``<name>.failed.ipynb``), without papermill's per-cell timings;
* ``<name>.log``: the cells' output as it happens;
* ``<name>.status.json``: status (ok, failed, skipped), seconds, parameters, code version, the error;
* ``<name>/``: the notebook's own files (its ``results_dir`` parameter, unless given).

``<name>`` is the notebook's stem, the profile, and the parameters given with ``-p`` (``01_task1_datadam-course
__ipc-10_seed-0``). A run is skipped when its status file says ``ok`` for the same parameters, the same
notebook code cells and the same ddlib sources (``ddlib.results.source_hash``: edits to results or
other files do not force a re-run; a new commit that changes no ddlib source does not either).

Profiles live in ``profiles.yaml`` beside the notebooks: ``defaults: {profile: params}`` applied to every
notebook, then ``<notebook stem>: {profile: params}``. Precedence: profile < ``-f`` file < ``-p``. Every
name is checked against the notebook's parameters cell. The smoke profile points ``DDLIB_DATA`` at the
tiny generated fixtures (``tests/fixtures.py``) unless ``data_root`` is given.
"""
from __future__ import annotations

import ast
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["RunnerConfig", "Run", "notebook_parameters", "requires_gpu", "find_notebooks", "load_profiles",
           "profile_params", "parse_values", "expand_sweep", "run_name", "plan", "run_all", "describe_parameters",
           "PROFILES_FILE", "BUILTIN_PROFILES"]

PROFILES_FILE = "profiles.yaml"
BUILTIN_PROFILES = ("smoke", "course", "paper")
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"


@dataclass
class RunnerConfig:
    out: Path                         # folder of executed notebooks, logs and status files
    profile: str = "smoke"            # smoke | course | paper (or any profile in profiles.yaml)
    jobs: int = 1                     # notebooks executed at the same time
    force: bool = False               # run even when an identical run already succeeded
    kernel: str = "python3"           # Jupyter kernel name
    timeout: float | None = None      # seconds allowed per notebook (None: no limit)
    results: Path | None = None       # runs table for the notebooks' record() calls (None: ddlib's default)
    gpu_available: bool | None = None  # None: ask torch; GPU-only notebooks are skipped without one
    cores: int | None = None          # CPU cores shared by the jobs (None: those this process may use)
    backend: str = "local"            # local (subprocesses here) | ray (one Ray task per run, ddlib.sweep)
    address: str | None = None        # Ray cluster address (None: $RAY_ADDRESS, else a Ray started here)
    cpus_per_run: int = 1             # ray: CPUs (and threads) of each notebook's task


@dataclass
class Run:
    notebook: Path                     # input notebook
    name: str                          # output base name
    params: dict[str, Any]             # every parameter passed to papermill
    profile: str                       # profile the parameters started from
    gpu_only: bool = False             # the notebook's metadata says it needs a GPU
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the kernel


# ------------------------------------------------------------------------------------------ notebooks
def _read(path: Path):
    import nbformat

    return nbformat.read(str(path), as_version=4)


def _parameters_cell(nb, path: Path):
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"{path.name} has {len(tagged)} cells tagged 'parameters'; it needs exactly one")
    return tagged[0]


def notebook_parameters(path: str | os.PathLike) -> dict[str, Any]:
    """The parameters cell's names and default values (in order)."""
    path = Path(path)
    cell = _parameters_cell(_read(path), path)
    params: dict[str, Any] = {}
    for stmt in ast.parse(cell.source).body:
        if not isinstance(stmt, ast.Assign) or not all(isinstance(t, ast.Name) for t in stmt.targets):
            raise ValueError(f"{path.name}: the parameters cell may only assign literals, got {ast.unparse(stmt)!r}")
        try:
            value = ast.literal_eval(stmt.value)
        except ValueError:
            raise ValueError(f"{path.name}: parameter {ast.unparse(stmt.targets[0])} is not a literal") from None
        for target in stmt.targets:
            params[target.id] = value
    return params


def requires_gpu(path: str | os.PathLike) -> bool:
    """``metadata.ddlib.requires_gpu`` of the notebook (False when absent)."""
    return bool(_read(Path(path)).metadata.get("ddlib", {}).get("requires_gpu", False))


def notebook_hash(path: str | os.PathLike) -> str:
    """sha256 (12 hex digits) of the code cells' sources and the ddlib metadata: outputs do not count."""
    nb = _read(Path(path))
    digest = hashlib.sha256(json.dumps(nb.metadata.get("ddlib", {}), sort_keys=True).encode())
    for cell in nb.cells:
        if cell.cell_type == "code":
            digest.update(cell.source.encode() + b"\0")
    return digest.hexdigest()[:12]


def find_notebooks(names: Sequence[str], folder: str | os.PathLike) -> list[Path]:
    """Paths for ``names`` (a path, a file name, a stem or a number prefix such as "01"); all numbered
    notebooks of ``folder`` when ``names`` is empty."""
    folder = Path(folder)
    if not names:
        found = sorted(folder.glob(NOTEBOOK_GLOB))
        if not found:
            raise FileNotFoundError(f"no numbered notebooks ({NOTEBOOK_GLOB}) in {folder}; pass --notebooks-dir")
        return found
    return [_find_one(name, folder) for name in names]


def _find_one(name: str, folder: Path) -> Path:
    path = Path(name)
    if path.suffix == ".ipynb" and path.exists():
        return path
    matches = sorted(p for p in folder.glob("*.ipynb") if p.stem == name or p.name == name
                     or p.stem.startswith(name + "_"))
    if len(matches) != 1:
        known = ", ".join(p.stem for p in sorted(folder.glob("*.ipynb"))) or "none"
        what = "matches no" if not matches else "matches more than one"
        raise FileNotFoundError(f"{name!r} {what} notebook in {folder}; known: {known}")
    return matches[0]


# ------------------------------------------------------------------------------------------ profiles
def load_profiles(folder: str | os.PathLike) -> dict[str, Any]:
    """``profiles.yaml`` of ``folder`` (``{}`` when there is none)."""
    import yaml

    path = Path(folder) / PROFILES_FILE
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: expected 'defaults' and notebook stems, each mapping profile -> parameters")
    return data


def known_profiles(profiles: dict[str, Any]) -> list[str]:
    """smoke, course, paper, then any other profile named in profiles.yaml."""
    extra = {name for entry in profiles.values() for name in entry} - set(BUILTIN_PROFILES)
    return [*BUILTIN_PROFILES, *sorted(extra)]


def profile_params(path: Path, profile: str, profiles: dict[str, Any]) -> dict[str, Any]:
    """The profile's parameters for this notebook (defaults, then the notebook's entry), validated."""
    if profile not in known_profiles(profiles):
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(known_profiles(profiles))}")
    params = {"smoke": True} if profile == "smoke" else {"smoke": False}
    params.update((profiles.get("defaults") or {}).get(profile) or {})
    params.update((profiles.get(path.stem) or {}).get(profile) or {})
    check_names(params, notebook_parameters(path), path, f"profile {profile!r} ({PROFILES_FILE})")
    return params


def check_names(params: dict[str, Any], known: dict[str, Any], path: Path, where: str) -> None:
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"{where} sets {', '.join(unknown)}, which {path.name} does not have; its parameters are: "
                         f"{', '.join(known)}")


# ------------------------------------------------------------------------------------------ sweeps
def parse_value(text: str) -> Any:
    """A Python literal (``10``, ``None``, ``[1, 2]``, ``'x'``), else YAML (``true``, ``null``), else the string."""
    import yaml

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_values(text: str) -> list[Any]:
    """``"1,10,50"`` -> [1, 10, 50]; a bracketed list or dict is one value."""
    stripped = text.strip()
    if stripped[:1] in "[{(" or "," not in stripped:
        return [parse_value(stripped)]
    return [parse_value(part.strip()) for part in stripped.split(",")]


def expand_sweep(overrides: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """The cross product of ``-p key values`` pairs (a key given twice: its last values win)."""
    axes: dict[str, list[Any]] = {}
    for key, text in overrides:
        axes[key] = parse_values(text)
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def _slug(value: Any) -> str:
    text = "+".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "_"


def run_name(stem: str, profile: str, varied: dict[str, Any]) -> str:
    """``<stem>-<profile>[__key-value_key-value]``, shortened with a hash beyond 150 characters."""
    name = f"{stem}-{profile}"
    if varied:
        name += "__" + "_".join(f"{k}-{_slug(v)}" for k, v in varied.items())
    if len(name) > 150:
        name = name[:138] + "-" + hashlib.sha256(name.encode()).hexdigest()[:10]
    return name


# ------------------------------------------------------------------------------------------ planning
def plan(notebooks: Sequence[Path], cfg: RunnerConfig, file_params: dict[str, Any] | None = None,
         overrides: Sequence[tuple[str, str]] = ()) -> list[Run]:
    """One Run per notebook and sweep point, every parameter name checked before anything runs."""
    runs = []
    for path in notebooks:
        profiles = load_profiles(path.parent)
        known = notebook_parameters(path)
        base = profile_params(path, cfg.profile, profiles)
        check_names(file_params or {}, known, path, "the -f parameters file")
        check_names({k: None for k, _ in overrides}, known, path, "-p")
        for point in expand_sweep(overrides):
            params = {**base, **(file_params or {}), **point}
            run = Run(notebook=path, name=run_name(path.stem, cfg.profile, point), params=params,
                      profile=cfg.profile, gpu_only=requires_gpu(path))
            explicit = {**(file_params or {}), **point}
            if "results_dir" in known and "results_dir" not in explicit:
                run.params["results_dir"] = str((cfg.out / run.name).resolve())
            runs.append(run)
    _check_unique(runs)
    return runs


def _check_unique(runs: Sequence[Run]) -> None:
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"several runs would write {', '.join(dupes)}; a notebook was named twice")


def describe_parameters(path: Path) -> str:
    """The parameters of a notebook with their defaults and each profile's values (a text table)."""
    from ddlib.results import format_table

    profiles = load_profiles(path.parent)
    names = known_profiles(profiles)
    defaults = notebook_parameters(path)
    values = {p: profile_params(path, p, profiles) for p in names}
    cells = [[k, repr(v), *(repr(values[p][k]) if k in values[p] else "" for p in names)]
             for k, v in defaults.items()]
    gpu = "needs a GPU" if requires_gpu(path) else "runs on a CPU"
    return f"{path.name} ({gpu}; profiles from {path.parent / PROFILES_FILE})\n" + \
        format_table(["parameter", "default", *names], cells)


# ------------------------------------------------------------------------------------------ execution
def run_all(runs: Sequence[Run], cfg: RunnerConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Execute ``runs`` ``cfg.jobs`` at a time; one failure does not stop the others. Returns the statuses."""
    if cfg.backend == "ray":
        from ddlib.sweep import run_notebooks_ray

        return run_notebooks_ray(runs, cfg, log)
    if cfg.backend != "local":
        raise ValueError(f"unknown backend {cfg.backend!r}; use local or ray")
    cfg.out.mkdir(parents=True, exist_ok=True)
    if cfg.jobs < 1 or (cfg.cores is not None and cfg.cores < 1):
        raise ValueError(f"jobs ({cfg.jobs}) and cores ({cfg.cores}) must be at least 1")
    cores = _cores() if cfg.cores is None else cfg.cores
    jobs = min(cfg.jobs, len(runs) or 1)
    threads = max(1, cores // jobs)
    log(f"{len(runs)} run(s), profile {cfg.profile}, {jobs} at a time, {threads} thread(s) each "
        f"(OMP_NUM_THREADS = {cores} cores // {jobs} jobs), into {cfg.out}")
    smoke_env = _smoke_env(runs, log)
    gpu = _gpu_available() if cfg.gpu_available is None else cfg.gpu_available
    lock = threading.Lock()
    live = _Live()

    def one(run: Run) -> dict[str, Any]:
        if run.profile == "smoke" and run.params.get("data_root") is None:
            run.env.update(smoke_env)
        status = _run_one(run, cfg, threads, gpu, live)
        with lock:
            log(_status_line(status))
        return status

    pool = ThreadPoolExecutor(max_workers=jobs)
    futures = [pool.submit(one, run) for run in runs]
    previous = _interrupt_on_sigterm()
    try:
        return [f.result() for f in futures]
    except KeyboardInterrupt:
        # papermill runs in its own session (a Ctrl-C in the terminal would not reach it), so stop it here;
        # each run's thread then writes its status as interrupted
        pool.shutdown(wait=False, cancel_futures=True)
        live.stop()
        raise
    finally:
        pool.shutdown(wait=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@dataclass
class _Live:
    """The running papermill processes and whether the runner is stopping (Ctrl-C or SIGTERM)."""
    procs: set = field(default_factory=set)  # subprocess.Popen of each running notebook
    stopping: threading.Event = field(default_factory=threading.Event)

    def start(self, proc: subprocess.Popen) -> None:
        self.procs.add(proc)
        if self.stopping.is_set():  # started just as the runner was stopped
            _kill(proc)

    def finish(self, proc: subprocess.Popen) -> None:
        self.procs.discard(proc)

    def stop(self) -> None:
        self.stopping.set()
        for proc in list(self.procs):
            _kill(proc)


def _interrupt_on_sigterm():
    """Make SIGTERM (a scheduler's or ``kill``'s stop) act like Ctrl-C, so the runner stops its notebooks
    instead of leaving them running orphaned; returns the previous handler (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        exc = KeyboardInterrupt(f"signal {signum}")
        exc.signum = signum  # the CLI exits with 128 + signum
        raise exc

    return signal.signal(signal.SIGTERM, stop)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _gpu_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _smoke_env(runs: Sequence[Run], log: Callable[[str], None]) -> dict[str, str]:
    """DDLIB_DATA and DDLIB_CACHE pointing at the generated fixtures (built once, in the temporary folder)."""
    if not any(r.profile == "smoke" for r in runs):
        return {}
    fixtures = Path(__file__).resolve().parents[1] / "tests" / "fixtures.py"
    if not fixtures.exists():
        log("smoke: tests/fixtures.py not found (installed package?); using your data root")
        return {}
    base = Path(tempfile.gettempdir()) / f"ddlib-smoke-{_user()}"
    root = base / "data"
    if not root.exists():
        import importlib.util

        base.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(dir=base))
        spec = importlib.util.spec_from_file_location("ddlib_test_fixtures", fixtures)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.make_data_root(building)
        try:
            os.rename(building, root)  # atomic: a parallel runner either wins or finds it complete
        except OSError:
            shutil.rmtree(building, ignore_errors=True)
    return {"DDLIB_DATA": str(root), "DDLIB_CACHE": str(base / "cache")}


def _user() -> str:
    return str(os.getuid()) if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")


def _kill(proc: subprocess.Popen) -> None:
    """Kill papermill and its kernel (they share a process group on POSIX)."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass


def _paths(run: Run, cfg: RunnerConfig) -> dict[str, Path]:
    out = cfg.out
    return {"output": out / f"{run.name}.ipynb", "failed": out / f"{run.name}.failed.ipynb",
            "log": out / f"{run.name}.log", "status": out / f"{run.name}.status.json",
            "tmp": out / ".tmp" / f"{run.name}.ipynb", "params": out / ".tmp" / f"{run.name}.params.yaml"}


def fingerprint(run: Run) -> dict[str, Any]:
    """What decides whether a finished run is still valid."""
    from ddlib.results import source_hash

    return {"parameters": _jsonable(run.params), "notebook_hash": notebook_hash(run.notebook),
            "source_hash": source_hash()}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _up_to_date(run: Run, paths: dict[str, Path]) -> bool:
    if not (paths["status"].exists() and paths["output"].exists()):
        return False
    try:
        old = json.loads(paths["status"].read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return old.get("status") == "ok" and old.get("fingerprint") == fingerprint(run)


def _run_one(run: Run, cfg: RunnerConfig, threads: int, gpu: bool, live: _Live) -> dict[str, Any]:
    from ddlib.io import save_json

    paths = _paths(run, cfg)
    status = {"name": run.name, "notebook": str(run.notebook), "profile": run.profile,
              "parameters": _jsonable(run.params), "output": str(paths["output"]), "log": str(paths["log"])}
    if run.gpu_only and not gpu:
        status.update(status="skipped", reason=f"{run.notebook.name} needs a GPU (metadata ddlib.requires_gpu) and "
                      "none is visible; run it on a CUDA machine")
        save_json(status, paths["status"])
        return status
    if not cfg.force and _up_to_date(run, paths):
        return {**json.loads(paths["status"].read_text()), "status": "ok", "skipped": "unchanged"}
    status["fingerprint"] = fingerprint(run)
    from ddlib.results import code_version

    status["code"] = code_version()
    status.update(status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    save_json(status, paths["status"])
    status.update(_execute(run, cfg, paths, threads, live))
    save_json(status, paths["status"])
    _record(run, status, cfg)
    return status


def _command(run: Run, cfg: RunnerConfig, paths: dict[str, Path]) -> list[str]:
    return [sys.executable, "-m", "papermill", str(run.notebook.resolve()), str(paths["tmp"].resolve()),
            "-f", str(paths["params"].resolve()), "--cwd", str(run.notebook.parent.resolve()), "-k", cfg.kernel,
            "--log-output", "--no-progress-bar"]


def child_env(run: Run, cfg: RunnerConfig, threads: int) -> dict[str, str]:
    """The kernel's environment: thread counts, no progress bars, the runs table, the run's name."""
    from ddlib.results import results_path

    env = dict(os.environ)
    env.pop("DDLIB_SMOKE", None)  # the smoke parameter decides, not a stray variable
    env.pop("MPLBACKEND", None)  # the kernel's inline backend embeds the figures in the executed notebook
    table = results_path(cfg.results)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "DDLIB_PROGRESS": "0",
                "DDLIB_RESULTS": str(table.resolve()) if table else "off",
                "DDLIB_RUN_NAME": f"notebook:{run.name}", "PYTHONUNBUFFERED": "1"})
    if run.params.get("smoke"):
        env["DDLIB_SMOKE"] = "1"
    env.update(run.env)
    return env


def _execute(run: Run, cfg: RunnerConfig, paths: dict[str, Path], threads: int, live: _Live) -> dict[str, Any]:
    from ddlib.io import atomic_write

    paths["tmp"].parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(run.params), indent=1)  # JSON is YAML: papermill reads the types back
    atomic_write(paths["params"], lambda f: f.write(text), mode="w")
    start = time.monotonic()
    with open(paths["log"], "w") as log:
        log.write(f"$ {' '.join(_command(run, cfg, paths))}\n")
        log.flush()
        proc = subprocess.Popen(_command(run, cfg, paths), stdout=log, stderr=subprocess.STDOUT,
                                env=child_env(run, cfg, threads), start_new_session=True)
        live.start(proc)
        try:
            code = proc.wait(timeout=cfg.timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            proc.wait()
            code = -1
        finally:
            live.finish(proc)
    seconds = round(time.monotonic() - start, 2)
    result = {"seconds": seconds, "returncode": code, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if live.stopping.is_set():
        status = "interrupted"
        error = "the runner was stopped (Ctrl-C or SIGTERM); run the same command again to redo it"
    elif code == 0 and paths["tmp"].exists():
        _finish(paths["tmp"], run)
        os.replace(paths["tmp"], paths["output"])
        paths["failed"].unlink(missing_ok=True)
        return {**result, "status": "ok"}
    else:
        status = "failed"
        error = f"timed out after {cfg.timeout} s" if code == -1 else _error_of(paths)
    if paths["tmp"].exists():  # keep the partial notebook for inspection, never as the output
        os.replace(paths["tmp"], paths["failed"])
    return {**result, "status": status, "error": error, "failed_notebook": str(paths["failed"])}


def _finish(path: Path, run: Run) -> None:
    """Drop papermill's volatile metadata (timings, temporary paths); keep profile and parameters."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    nb.metadata["ddlib_run"] = {"profile": run.profile, "parameters": _jsonable(run.params)}
    nbformat.write(nb, str(path))


def _error_of(paths: dict[str, Path]) -> str:
    """The first error output of the failed notebook, else the end of the log."""
    if paths["tmp"].exists():
        try:
            nb = _read(paths["tmp"])
            for i, cell in enumerate(nb.cells):
                for out in cell.get("outputs", []):
                    if out.get("output_type") == "error":
                        return f"{out.get('ename')}: {out.get('evalue')} (cell {i})"
        except Exception:  # a half-written notebook: fall back to the log
            pass
    tail = paths["log"].read_text(errors="replace").strip().splitlines()[-3:] if paths["log"].exists() else []
    return " | ".join(tail) or "papermill failed without output"


def _record(run: Run, status: dict[str, Any], cfg: RunnerConfig) -> None:
    """One row per executed notebook in the runs table (status and seconds, for the report's compute time)."""
    from ddlib.results import record

    metrics = {"notebook": run.notebook.stem, "status": status["status"], "seconds": status.get("seconds"),
               "profile": run.profile}
    record(metrics, run.params, source=f"notebook:{run.name}", path=cfg.results)


def _status_line(status: dict[str, Any]) -> str:
    state = status["status"] + (" (unchanged)" if status.get("skipped") else "")
    detail = status.get("error") or status.get("reason") or ""
    seconds = f"{status['seconds']:.0f} s" if status.get("seconds") is not None else ""
    return f"  {state:16s} {status['name']:50s} {seconds:>8s}  {detail}".rstrip()


def clean_tmp(out: Path) -> None:
    """Remove the temporary folder when no run is left in it."""
    tmp = out / ".tmp"
    if tmp.exists() and not any(tmp.glob("*.ipynb")):
        shutil.rmtree(tmp, ignore_errors=True)
