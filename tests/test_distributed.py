"""Class sharding and expert splitting under torchrun (2 CPU processes, gloo) against a single process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddlib import distributed
from ddlib.cli import main
from ddlib.synset import SyntheticSet

TINY = ["--dataset", "digits", "--image-size", "8", "--ipc", "2", "--batch-real", "16", "--no-eval",
        "--device", "cpu", "--set", "log_every=2"]
METHODS = {"dm": ["--iterations", "4"], "datadam": ["--iterations", "4"],
           "dc": ["--iterations", "2", "--outer-loop", "2", "--inner-loop", "2"]}
EXPERTS = ["experts", "--dataset", "digits", "--image-size", "8", "--num-experts", "3", "--epochs", "1",
           "--subset", "20", "--device", "cpu"]
JOB = Path(__file__).with_name("torchrun_job.py")


def _commands(root: Path) -> list[list[str]]:
    runs = [["distill", "--method", m, *TINY, *extra, "--out", str(root / m)] for m, extra in METHODS.items()]
    return runs + [[*EXPERTS, "--out", str(root / "experts")]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same commands in one process (1 thread, as torchrun gives each rank) and under torchrun with 2."""
    root = tmp_path_factory.mktemp("sharding")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDLIB_RESULTS": str(root / "multi.jsonl"), "DDLIB_PROGRESS": "0"}
    env.pop("WORLD_SIZE", None)
    launch = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               str(JOB), json.dumps(_commands(root / "multi"))], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # DC's inner training sums over threads: compare at the ranks' thread count
    try:
        os.environ["DDLIB_RESULTS"] = "off"
        for argv in _commands(root / "single"):
            assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
        os.environ.pop("DDLIB_RESULTS", None)
    output, _ = launch.communicate(timeout=300)
    assert launch.returncode == 0, output[-3000:]
    return root, output


@pytest.mark.parametrize("method", list(METHODS))
def test_sharded_synthetic_set_is_bit_identical(runs, method):
    root, _ = runs
    single = SyntheticSet.load(root / "single" / method / "synset.pt")
    sharded = SyntheticSet.load(root / "multi" / method / "synset.pt")
    assert torch.equal(single.images, sharded.images)
    assert torch.equal(single.labels, sharded.labels)
    # the logged loss is summed over ranks in another order: equal to float32 rounding
    assert sharded.meta["history"]["loss"] == pytest.approx(single.meta["history"]["loss"], rel=1e-5)


def test_only_rank_zero_writes_and_logs_are_prefixed(runs):
    root, output = runs
    rows = [json.loads(line) for line in (root / "multi.jsonl").read_text().splitlines()]
    assert sorted(r["metrics"]["method"] for r in rows) == sorted(METHODS)  # one row per run, not per rank
    assert "[rank 1/2] distilled; rank 0 writes the results" in output
    assert "[rank 0/2] wrote" in output and "[rank 1/2] wrote" not in output


def test_expert_split_writes_the_same_files(runs):
    root, _ = runs
    single, multi = root / "single" / "experts", root / "multi" / "experts"
    assert json.loads((multi / "index.json").read_text()) == json.loads((single / "index.json").read_text())
    names = sorted(p.name for p in single.glob("expert_*.pt"))
    assert names == sorted(p.name for p in multi.glob("expert_*.pt")) and len(names) == 3


def test_class_blocks_are_contiguous_and_cover_every_class():
    assert distributed.class_blocks(10, 3) == [slice(0, 4), slice(4, 7), slice(7, 10)]
    assert distributed.class_blocks(10, 1) == [slice(0, 10)]
    with pytest.raises(ValueError, match="at most one process per class"):
        distributed.class_blocks(2, 3)
    assert distributed.owned_items(range(5), distributed.Launch(1, 2, 1)) == [1, 3]


def test_single_process_never_joins_a_process_group(runs, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.launch() is None and distributed.class_shard(10) is None
    assert not torch.distributed.is_initialized()
    assert distributed.all_reduce_sum({"loss": torch.tensor(1.0)})["loss"] == 1.0
