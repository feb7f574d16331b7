"""Speed-up of class sharding (torchrun) over one process, on MNIST by default.

    python -m bench.sharding [--methods dm,datadam] [--procs 1,2] [--iterations 20] [--data-root ../shared/data]
                             [--device cpu|cuda] [--out results/bench]

For every method and process count N it runs ``ddlib distill`` (N = 1: one process; N > 1: ``torchrun
--standalone --nproc-per-node N``), each process with ``--threads`` threads (default 1, torchrun's default),
and reads the distillation's seconds per iteration from metrics.json (rank 0's wall clock, the gathers
included). On a CPU it also times one process with N x threads (the same cores, no sharding), and checks
that the sharded synthetic set equals the single-process one bit for bit. On CUDA each rank takes one GPU
(N <= the GPUs visible). Writes ``<out>/sharding-<device>.json`` and prints a table. Not run by the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def distill(method: str, procs: int, threads: int, args: argparse.Namespace, out: Path) -> dict:
    """One run; its metrics.json (seconds_per_iteration, ...)."""
    flags = ["--method", method, "--dataset", args.dataset, "--ipc", str(args.ipc), "--iterations",
             str(args.iterations), "--no-eval", "--results", "off", "--device", args.device, "--out", str(out),
             "--set", f"log_every={args.iterations}", "--checkpoint-every", "0"]
    if args.data_root:
        flags += ["--data-root", args.data_root]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), "-m",
                 "ddlib"] if procs > 1 else [sys.executable, "-m", "ddlib"])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "DDLIB_PROGRESS": "0"}
    done = subprocess.run([*launcher, "distill", *flags], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{method} with {procs} process(es) failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return json.loads((out / "metrics.json").read_text())


def same_images(a: Path, b: Path) -> bool:
    import torch

    from ddlib.synset import SyntheticSet

    return torch.equal(SyntheticSet.load(a / "synset.pt").images, SyntheticSet.load(b / "synset.pt").images)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sharding", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="dm,datadam")
    p.add_argument("--procs", default="1,2", help="process counts (1 first: the reference)")
    p.add_argument("--threads", type=int, default=1, help="threads per process")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="results/bench")
    args = p.parse_args(argv)
    from ddlib.utils import cpu_name, environment

    procs = [int(n) for n in args.procs.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            base = None
            for n in procs:
                folder = Path(tmp) / f"{method}-{n}"
                sec = distill(method, n, args.threads, args, folder)["seconds_per_iteration"]
                row = {"method": method, "processes": n, "threads_per_process": args.threads,
                       "seconds_per_iteration": sec}
                if base is None:
                    base = (sec, folder)
                else:
                    row["speedup"] = base[0] / sec
                    row["bit_identical"] = same_images(base[1], folder)
                if n > 1 and args.device == "cpu":  # the same cores as threads of one process
                    wide = distill(method, 1, n * args.threads, args, Path(tmp) / f"{method}-1x{n}")
                    row["one_process_same_cores_seconds"] = wide["seconds_per_iteration"]
                rows.append(row)
                print(json.dumps(row))
    report = {"dataset": args.dataset, "ipc": args.ipc, "iterations": args.iterations, "device": args.device,
              "cpu": cpu_name(), "environment": environment(), "rows": rows}
    if args.device.startswith("cuda"):
        import torch

        report["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sharding-{args.device.split(':')[0]}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print("\n| method | processes x threads | s/iteration | speed-up | 1 process, same cores | identical |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['processes']} x {r['threads_per_process']} | {r['seconds_per_iteration']:.3f} | "
              f"{r.get('speedup', 1):.2f} | {r.get('one_process_same_cores_seconds', float('nan')):.3f} | "
              f"{r.get('bit_identical', '-')} |")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
