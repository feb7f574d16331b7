"""Fault injection: interrupted runs resume bit-identically; corrupt, truncated, malicious and mismatched
files, a full disk, a second writer, a NaN loss and a CUDA OOM all end in clear errors with nothing lost."""
from __future__ import annotations

import errno
import io
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures import make_mhist

from ddlib.checkpoint import (
    FORMAT,
    Checkpointer,
    CheckpointError,
    Interrupted,
    RunLock,
    RunLockedError,
    checkpoint_path,
)
from ddlib.cli import main
from ddlib.data import load_dataset
from ddlib.evaluate import DatasetMismatchError, check_compatible
from ddlib.io import DiskFullError, load_checked, save_checked
from ddlib.methods import DivergenceError, get_method, make_config
from ddlib.methods.base import distill_with
from ddlib.synset import SynsetFormatError, SyntheticSet
from ddlib.trajectory import ExpertConfig, train_experts

TINY = dict(ipc=1, iterations=5, batch_real=4, log_every=1, model="convnetw16")
METHODS = {
    "dm": {},
    "datadam": {},
    "dc": dict(outer_loop=2, inner_loop=1, batch_train=10),
    "dd": dict(ipc=2, epochs=1, decay_every=2),
    "mtt": dict(syn_steps=2, expert_epochs=1, max_start_epoch=2, batch_syn=5, lr_img=10.0, lr_lr=1e-8),
    "datm": dict(syn_steps=2, expert_epochs=1, max_start_epoch=2, current_max_start_epoch=1, expansion_end_epoch=3,
                 batch_syn=5, lr_img=10.0),
}
CLI_RUN = ["distill", "--method", "dm", "--dataset", "digits", "--image-size", "8", "--ipc", "1", "--batch-real",
           "4", "--model", "convnetw16", "--no-dsa", "--no-eval", "--results", "off", "--device", "cpu"]
KILL_ITERATIONS = 150


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", image_size=8)


@pytest.fixture(scope="module")
def experts(digits, tmp_path_factory):
    cfg = ExpertConfig(num_experts=1, epochs=2, model="convnetw16", subset=5, batch_size=32)
    return str(train_experts(digits, cfg, tmp_path_factory.mktemp("experts"), seed=0, show_progress=False))


def distiller(method, digits, experts, **kw):
    extra = dict(experts=experts) if method in ("mtt", "datm") else {}
    return get_method(method)(digits, make_config(method, **{**TINY, **METHODS[method], **extra, **kw}), seed=0)


def same_run(a: SyntheticSet, b: SyntheticSet) -> bool:
    history = [{k: v for k, v in s.meta["history"].items() if k != "seconds"} for s in (a, b)]
    lr_same = (a.lr is None and b.lr is None) or torch.equal(a.lr, b.lr)
    return torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and lr_same and history[0] == history[1]


def interrupt_at(iteration: int, signum: int = signal.SIGINT):
    """A callback that sends this process ``signum`` after ``iteration`` (the run's handler catches it)."""
    def callback(it, distiller, record):
        if it == iteration:
            os.kill(os.getpid(), signum)
    return callback


# ------------------------------------------------------------------------------- exact resume, every method
@pytest.mark.parametrize("method", list(METHODS))
def test_interrupted_run_resumes_bit_identically(method, digits, experts, tmp_path):
    reference = distill_with(distiller(method, digits, experts), show_progress=False)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with pytest.raises(Interrupted, match="--resume"):
        distill_with(distiller(method, digits, experts), show_progress=False, callbacks=(interrupt_at(3),),
                     checkpoint_dir=tmp_path, checkpoint_every=2)
    assert load_checked(tmp_path / "checkpoint.pt", "ddlib.Checkpoint", ValueError, "")["loop"]["iteration"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # the run's handler is removed again
    resumed = distill_with(distiller(method, digits, experts), show_progress=False, checkpoint_dir=tmp_path,
                           resume=True)
    assert same_run(reference, resumed)


def test_every_learnable_tensor_and_optimiser_is_in_the_state(digits, experts):
    for method in METHODS:
        d = distiller(method, digits, experts)
        for name, value in vars(d).items():
            stateful = isinstance(value, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)) or (
                isinstance(value, torch.Tensor) and value.requires_grad)
            assert not stateful or name in d.state_attrs, f"{method}.{name} is not checkpointed"


def test_sigterm_and_a_longer_resume(digits, experts, tmp_path):
    """SIGTERM checkpoints like SIGINT; a resume may raise the iteration count (same result as one long run)."""
    reference = distill_with(distiller("dm", digits, experts, iterations=6), show_progress=False)
    with pytest.raises(Interrupted) as stopped:
        distill_with(distiller("dm", digits, experts, iterations=4), show_progress=False,
                     callbacks=(interrupt_at(2, signal.SIGTERM),), checkpoint_dir=tmp_path)
    assert stopped.value.signum == signal.SIGTERM
    resumed = distill_with(distiller("dm", digits, experts, iterations=6), show_progress=False,
                           checkpoint_dir=tmp_path, resume=True)
    assert same_run(reference, resumed)


def test_resume_refuses_another_run(digits, experts, tmp_path):
    distill_with(distiller("dm", digits, experts, iterations=2), show_progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="batch_real"):
        distill_with(distiller("dm", digits, experts, batch_real=5), show_progress=False, checkpoint_dir=tmp_path,
                     resume=True)
    other = get_method("dm")(load_dataset("digits", image_size=9), make_config("dm", **TINY), seed=0)
    with pytest.raises(CheckpointError, match="image_size"):
        distill_with(other, show_progress=False, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        distill_with(distiller("dm", digits, experts), show_progress=False, checkpoint_dir=tmp_path / "no",
                     resume=True)


def test_resume_of_a_checkpoint_older_than_a_config_field(digits, experts, tmp_path):
    """A checkpoint written before a config field existed resumes when the run keeps that field's default."""
    distill_with(distiller("dm", digits, experts, iterations=2), show_progress=False, checkpoint_dir=tmp_path)
    path = checkpoint_path(tmp_path)
    body = load_checked(path, FORMAT, CheckpointError, "")
    del body["config"]["compile"]  # as written before `compile` was added
    save_checked(body, path, FORMAT)
    resumed = distill_with(distiller("dm", digits, experts, iterations=3), show_progress=False,
                           checkpoint_dir=tmp_path, resume=True)
    assert resumed.meta["iterations"] == 3
    with pytest.raises(CheckpointError, match="compile"):
        distill_with(distiller("dm", digits, experts, iterations=4, compile=True), show_progress=False,
                     checkpoint_dir=tmp_path, resume=True)


def test_cli_resume_of_a_checkpoint_older_than_a_config_field(tmp_path, capsys):
    """The command line reads an older checkpoint's config the same way: the missing field is its default."""
    assert main([*CLI_RUN, "--iterations", "1", "--out", str(tmp_path)]) == 0
    path = checkpoint_path(tmp_path)
    body = load_checked(path, FORMAT, CheckpointError, "")
    del body["config"]["compile"]
    save_checked(body, path, FORMAT)
    assert main([*CLI_RUN, "--resume", str(tmp_path), "--iterations", "2", "--set", "compile=false"]) == 0
    assert main([*CLI_RUN, "--resume", str(tmp_path), "--iterations", "3", "--compile"]) == 2
    assert "compile=True (checkpoint: False)" in capsys.readouterr().err


def test_cli_resume_stays_on_the_run_s_device(tmp_path, monkeypatch, capsys):
    """A run started with --device cpu resumes on the CPU even where a GPU is visible (seen on a lent H100:
    the resume went to CUDA and no longer matched the uninterrupted run); --device still overrides."""
    from ddlib.cli import _resume_device, _resume_settings, build_parser

    assert main([*CLI_RUN, "--iterations", "1", "--out", str(tmp_path)]) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = build_parser().parse_args(["distill", "--resume", str(tmp_path)])
    _resume_settings(args)
    assert args.device == "cpu"
    assert _resume_device("cuda:1", "cpu") == "cuda:1"
    assert _resume_device("auto", None) == "auto"  # a checkpoint from before the device was recorded
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _resume_device("auto", "cuda") == "auto" and "lacks" in capsys.readouterr().err


# ------------------------------------------------------------------------------- killed subprocesses
@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    assert main([*CLI_RUN, "--iterations", str(KILL_ITERATIONS), "--out", str(out)]) == 0
    return SyntheticSet.load(out / "synset.pt")


@pytest.mark.parametrize("signum, seed", [(signal.SIGKILL, 0), (signal.SIGKILL, 1), (signal.SIGINT, 2)],
                         ids=["sigkill-0", "sigkill-1", "sigint"])
def test_killed_distill_resumes_to_the_same_set(signum, seed, cli_reference, tmp_path, capsys):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", DDLIB_PROGRESS="0")
    proc = subprocess.Popen([sys.executable, "-m", "ddlib", *CLI_RUN, "--iterations", str(KILL_ITERATIONS),
                             "--checkpoint-every", "3", "--out", str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0, 0.3))  # a random later iteration
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    done = load_checked(out / "checkpoint.pt", "ddlib.Checkpoint", ValueError, "")["loop"]["iteration"]
    assert 0 < done < KILL_ITERATIONS, "the run ended before the signal: raise KILL_ITERATIONS"
    if signum == signal.SIGINT:
        assert proc.returncode == 130 and f"--resume {out}" in err and "Traceback" not in err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert main(["distill", "--resume", str(out), "--no-eval", "--results", "off"]) == 0  # takes the stale lock over
    assert same_run(cli_reference, SyntheticSet.load(out / "synset.pt"))
    assert not (out / ".lock").exists()


# ------------------------------------------------------------------------------- files: disk, corruption, code
def _checkpointed(digits, experts, folder: Path) -> Path:
    distill_with(distiller("dm", digits, experts, iterations=2), show_progress=False, checkpoint_dir=folder)
    return folder / "checkpoint.pt"


def test_disk_full_keeps_the_previous_checkpoint(digits, experts, tmp_path, monkeypatch):
    path = _checkpointed(digits, experts, tmp_path)
    before = path.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(DiskFullError, match=f"disk full while writing {path}.*unchanged"):
        distill_with(distiller("dm", digits, experts, iterations=4), show_progress=False, checkpoint_dir=tmp_path,
                     checkpoint_every=1)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary file left behind


def test_truncated_and_bit_flipped_checkpoints_are_detected(digits, experts, tmp_path):
    path = _checkpointed(digits, experts, tmp_path)
    data = bytearray(path.read_bytes())
    ckpt = Checkpointer(tmp_path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match=f"{path} is not a readable"):
        ckpt.load(distiller("dm", digits, experts))
    saved = torch.load(io.BytesIO(bytes(data)), weights_only=True)["body"]["state"]["images"]
    pos = bytes(data).find(saved.numpy().tobytes()[:16])  # the images' bytes are in the file verbatim
    assert pos > 0
    data[pos + 5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        ckpt.load(distiller("dm", digits, experts))


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_malicious_files_are_refused_without_running_code(kind, digits, experts, tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    with open(path, "wb") as f:
        torch.save({"format": _Payload(marker)}, f) if kind == "torch" else pickle.dump(_Payload(marker), f)
    with pytest.raises(SynsetFormatError, match="not a readable"):
        SyntheticSet.load(path)
    with pytest.raises(CheckpointError, match="not a readable"):
        Checkpointer(path.parent).load(distiller("dm", digits, experts))
    assert main(["distill", "--resume", str(path.parent), "--no-eval", "--results", "off"]) == 2
    assert main(["evaluate", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not marker.exists()


def test_synset_tensors_are_validated(digits, tmp_path):
    meta = {"dataset": digits.meta()}
    SyntheticSet(torch.zeros(2, 1, 8, 8), torch.tensor([0, 10]), None, meta).save(tmp_path / "bad.pt")
    with pytest.raises(SynsetFormatError, match="outside the 10 classes"):
        SyntheticSet.load(tmp_path / "bad.pt")
    with pytest.raises(SynsetFormatError, match="NaN"):
        SyntheticSet(torch.full((2, 1, 8, 8), float("nan")), torch.tensor([0, 1]))


def test_mismatched_normalisation_is_refused(digits):
    synset = SyntheticSet(torch.zeros(10, 1, 8, 8), torch.arange(10), None,
                          {"dataset": {**digits.meta(), "mean": [0.1307], "std": [0.3081]}})
    with pytest.raises(DatasetMismatchError, match="normalised with mean"):
        check_compatible(synset, digits)


def test_corrupt_mhist_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("DDLIB_CACHE", str(tmp_path / "cache"))
    make_mhist(tmp_path, size=8, per_split={("train", "HP"): 2, ("train", "SSA"): 2, ("test", "HP"): 1,
                                            ("test", "SSA"): 1})
    first = load_dataset("mhist", root=tmp_path, image_size=8)
    cache = Path(first.info["cache"])
    entry = torch.load(cache, weights_only=True)
    entry["images"][0, 0, 0, 0] ^= 1  # a flipped bit that torch.load cannot see
    torch.save(entry, cache)
    with pytest.warns(UserWarning, match="checksum"):
        again = load_dataset("mhist", root=tmp_path, image_size=8)
    assert not again.info["cache_hit"] and torch.equal(again.train_images, first.train_images)


# ------------------------------------------------------------------------------- locks, NaN, OOM
def test_lock_refuses_a_second_writer_and_takes_over_a_dead_one(tmp_path, capsys):
    out = tmp_path / "run"
    with RunLock(out):
        with pytest.raises(RunLockedError, match="--force"):
            RunLock(out).__enter__()
        assert main([*CLI_RUN, "--iterations", "1", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{out / '.lock'}" in err and "--force" in err and f"process {os.getpid()}" in err
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".lock").write_text(f'{{"pid": {int(dead.stdout)}, "host": "{os.uname().nodename}"}}\n')
    assert main([*CLI_RUN, "--iterations", "1", "--out", str(out)]) == 0
    assert "no longer running" in capsys.readouterr().err and not (out / ".lock").exists()


def test_nan_loss_stops_with_the_last_good_checkpoint(digits, experts, tmp_path):
    d = distiller("dm", digits, experts, iterations=8)
    step = d.step

    def poisoned(iteration):
        scalars = step(iteration)
        return {**scalars, "loss": scalars["loss"] * float("nan")} if iteration == 4 else scalars

    d.step = poisoned
    with pytest.raises(DivergenceError, match=f"iteration 5: loss became NaN.*iteration 4.*{tmp_path}") as err:
        distill_with(d, show_progress=False, checkpoint_dir=tmp_path, checkpoint_every=2)
    assert load_checked(tmp_path / "checkpoint.pt", "ddlib.Checkpoint", ValueError, "")["loop"]["iteration"] == 4
    assert bool(torch.isfinite(err.value.last_good.images).all())


def test_cuda_out_of_memory_names_the_flags(monkeypatch, capsys):
    import ddlib.methods

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ddlib.methods, "distill", oom)
    assert main([*CLI_RUN, "--iterations", "1"]) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "--batch-real" in err and "--chunk" in err and "Traceback" not in err


def test_cli_refuses_to_start_over_an_unfinished_run(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        d = get_method("dm")(load_dataset("digits", image_size=8), make_config(
            "dm", ipc=1, iterations=4, batch_real=4, model="convnetw16", dsa=False, log_every=1), seed=0)
        distill_with(d, show_progress=False, callbacks=(interrupt_at(2),), checkpoint_dir=out)
    assert main([*CLI_RUN, "--iterations", "4", "--out", str(out)]) == 2
    assert f"--resume {out}" in capsys.readouterr().err
    assert main(["distill", "--resume", str(out), "--batch-real", "8", "--no-eval", "--results", "off"]) == 2
    assert "batch_real" in capsys.readouterr().err
