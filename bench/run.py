"""Cost of one iteration of every distillation method: ``python -m bench [--quick] [--only NAME ...]``.

Each entry builds the method's ``Distiller`` on real data, runs warm-up iterations, then times
``--repeats`` iterations (or DC's outer steps), and writes one JSON per entry under ``--out`` plus a
markdown table (``table.md``). FLOPs per iteration are counted with ``torch.utils.flop_counter``
(matrix products and convolutions, FLOP = 2 x MAC) over one timed unit; the achieved FLOP/s is compared
with this machine's fp32 matmul rate, measured in the same run. Timings are medians after warm-up.

Trajectory entries (mtt, datm, pad) first train small expert trajectories on the entry's dataset
(cached under ``--experts-cache``; resumed if present) and time the distillation iterations only; their
entries at several (syn_steps, batch_syn) give the unrolled student's peak memory against both.

``--profile`` also runs one unit under ``torch.profiler`` and records where its time goes: the self time
of the ATen operators grouped into convolutions, matrix products, normalisations, pooling, and the rest
(elementwise ops, reductions and copies), plus the top operators, so a low FLOP/s fraction can be traced.

``--accuracy-iterations K`` (off by default: minutes to hours per entry) also runs K iterations from the
seed and evaluates the result with one fixed protocol (``dc``, ``--accuracy-epochs`` epochs, one network),
so entries can be compared at a fixed budget; the results/ runs hold the papers'-budget accuracies.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ddlib.data import load_dataset
from ddlib.evaluate import evaluate_synset
from ddlib.io import atomic_write, save_json
from ddlib.methods import distill_with, get_method, make_config
from ddlib.metrics import PeakMemory
from ddlib.trajectory import ExpertConfig, train_experts
from ddlib.utils import PRECISION_DTYPES, environment, resolve_device


@dataclass
class Entry:
    """One benchmark: a method on a dataset with fixed settings."""

    name: str
    method: str
    dataset: str
    settings: dict = field(default_factory=dict)  # DistillConfig overrides
    unit: str = "iteration"                       # "iteration" or "outer step" (DC: one matching + inner)
    reference: str = ""                           # the official code's figure on its machine, for the table
    quick: bool = True                            # part of --quick
    experts: dict | None = None                   # ExpertConfig fields: train (or reuse) these experts first


TINY_EXPERTS = dict(num_experts=2, epochs=6, subset=100, half=True)

ENTRIES = [
    Entry("dm-mnist-ipc10", "dm", "mnist", dict(ipc=10, batch_real=256),
          reference="2.48 s/it (official DM, issue author's CPU: 190 GFLOP/s fp32)"),
    Entry("datadam-mnist-ipc10", "datadam", "mnist", dict(ipc=10, batch_real=64),
          reference="1.40 s/it (official DataDAM, issue author's CPU)"),
    Entry("dm-mnist-ipc10-compile", "dm", "mnist", dict(ipc=10, batch_real=256, compile=True), quick=False,
          reference="dm-mnist-ipc10 with --compile (compiling happens in the warm-up)"),
    Entry("datadam-mnist-ipc10-compile", "datadam", "mnist", dict(ipc=10, batch_real=64, compile=True),
          quick=False, reference="datadam-mnist-ipc10 with --compile (compiling happens in the warm-up)"),
    Entry("dm-mnist-ipc50", "dm", "mnist", dict(ipc=50, batch_real=256), quick=False,
          reference="official DM at IPC 50: bench.dm_reference --ipc 50 times it side by side"),
    Entry("datadam-mnist-ipc50", "datadam", "mnist", dict(ipc=50, batch_real=64), quick=False,
          reference="official DataDAM at IPC 50: bench.datadam_reference --ipc 50"),
    Entry("dm-mnist-ipc10-b64", "dm", "mnist", dict(ipc=10, batch_real=64), quick=False,
          reference="DM at DataDAM's settings, for the DataDAM vs DM comparison"),
    Entry("dc-mnist-ipc1", "dc", "mnist", dict(ipc=1, batch_real=256),
          reference="7.79 s/it (official DC, issue author's CPU; bench.dc_reference times it here)"),
    Entry("dc-mnist-ipc10-batched", "dc", "mnist", dict(ipc=10, batch_real=256, class_grads="batched"),
          unit="outer step", reference="~17.9 s/outer step (179 s/it over 10 outer steps, official DC)"),
    Entry("dc-mnist-ipc10-loop", "dc", "mnist", dict(ipc=10, batch_real=256, class_grads="loop"),
          unit="outer step", quick=False),
    Entry("dc-mnist-ipc50", "dc", "mnist", dict(ipc=50, batch_real=256), unit="outer step", quick=False,
          reference="official DC at IPC 50 (50 outer x 10 inner): bench.dc_reference --ipc 50"),
    Entry("dc-mnist-ipc1-hessian", "dc", "mnist", dict(ipc=1, batch_real=256, hessian_weight=1.0, hessian_probes=1),
          quick=False, reference="DC with the higher-order term (one Rademacher probe); no official code"),
    Entry("dsa-mnist-ipc10", "dsa", "mnist", dict(ipc=10, batch_real=256), unit="outer step", quick=False),
    Entry("dd-mnist-ipc10", "dd", "mnist", dict(ipc=10, batch_real=100)),
    # trajectory matching: experts are 2 SGD networks x 6 epochs on 100 images/class (cost is independent
    # of how good the experts are); N = syn_steps, b = batch_syn
    Entry("mtt-mnist-ipc10-n10-b100", "mtt", "mnist", dict(ipc=10, syn_steps=10, batch_syn=100, expert_epochs=2,
          max_start_epoch=4), experts=TINY_EXPERTS),
    Entry("mtt-mnist-ipc10-n20-b100", "mtt", "mnist", dict(ipc=10, syn_steps=20, batch_syn=100, expert_epochs=2,
          max_start_epoch=4), experts=TINY_EXPERTS, quick=False),
    Entry("mtt-mnist-ipc10-n10-b50", "mtt", "mnist", dict(ipc=10, syn_steps=10, batch_syn=50, expert_epochs=2,
          max_start_epoch=4), experts=TINY_EXPERTS, quick=False),
    Entry("mtt-mnist-ipc10-n20-b50", "mtt", "mnist", dict(ipc=10, syn_steps=20, batch_syn=50, expert_epochs=2,
          max_start_epoch=4), experts=TINY_EXPERTS, quick=False),
    Entry("datm-mnist-ipc10", "datm", "mnist", dict(ipc=10, syn_steps=10, batch_syn=100, expert_epochs=2,
          current_max_start_epoch=2, max_start_epoch=4), experts=TINY_EXPERTS),
    Entry("pad-mnist-ipc10", "pad", "mnist", dict(ipc=10, syn_steps=10, batch_syn=100, expert_epochs=2,
          current_max_start_epoch=2, max_start_epoch=4), experts=TINY_EXPERTS, quick=False),
]


def matmul_flops_per_second(device: torch.device, size: int = 2048, seconds: float = 1.0,
                            dtype: torch.dtype = torch.float32) -> float:
    """Measured matmul rate of this device in ``dtype`` (FLOP/s, FLOP = 2 x MAC)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size ** 3 * count / (time.perf_counter() - start)


OP_KINDS = (  # (kind, substrings of an ATen operator's name); the first match wins
    ("convolution", ("convolution",)),
    ("matmul", ("::mm", "::addmm", "::bmm", "::matmul", "::linear", "::baddbmm")),
    ("normalisation", ("group_norm", "batch_norm", "layer_norm", "instance_norm")),
    ("pooling", ("pool",)),
)


def op_kind(name: str) -> str:
    """The kind of a profiler event: one of OP_KINDS, 'elementwise and copies' for the other ATen
    operators, or 'other' (autograd and Python overhead outside ATen)."""
    if not name.startswith("aten::"):
        return "other"
    return next((kind for kind, keys in OP_KINDS if any(k in name for k in keys)), "elementwise and copies")


def profile_unit(unit: Callable[[int], object], i: int, device: torch.device, top: int = 15) -> dict:
    """Run ``unit(i)`` under torch.profiler: its self time by operator kind (shares) and the ``top`` operators."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        unit(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def self_us(event) -> float:
        if device.type == "cuda":
            return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
        return event.self_cpu_time_total

    events = [(e.key, self_us(e) / 1e6, e.count) for e in prof.key_averages()]
    total = sum(t for _, t, _ in events) or 1.0
    by_kind: dict[str, float] = {}
    for name, seconds, _ in events:
        kind = op_kind(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds / total
    events.sort(key=lambda e: -e[1])
    return {"clock": "device" if device.type == "cuda" else "cpu", "seconds": total,
            "by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "top_ops": [{"name": n, "seconds": t, "calls": c} for n, t, c in events[:top]]}


def unit_function(entry: Entry, distiller) -> Callable[[int], object]:
    """What one timed unit runs: a whole iteration, or DC's first (matching + inner training) outer step."""
    if entry.unit == "outer step":
        return lambda i: distiller.outer_step(i, 0)
    return distiller.step


def run_entry(entry: Entry, args: argparse.Namespace, matmul_rate: float, precision_rate: float) -> dict:
    device = resolve_device(args.device)
    real = load_dataset(entry.dataset, root=args.data_root, device=device)
    settings = {**entry.settings, "precision": args.precision}
    if entry.experts is not None:
        settings["experts"] = str(cached_experts(entry, real, Path(args.experts_cache), device))
    cfg = make_config(entry.method, **settings)
    distiller = get_method(entry.method)(real, cfg, seed=0, device=device)
    unit = unit_function(entry, distiller)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for i in range(args.warmup):
        unit(i)
    sync()
    warmup_seconds = time.perf_counter() - start  # first-use costs: allocation, torch.compile's compiling
    with FlopCounterMode(display=False) as counter:
        unit(args.warmup)
    flops = counter.get_total_flops()
    times = []
    with PeakMemory(device) as memory:
        for i in range(args.repeats):
            sync()
            start = time.perf_counter()
            unit(args.warmup + 1 + i)
            sync()
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    profiled = {"profile": profile_unit(unit, args.warmup + 1 + args.repeats, device)} if args.profile else {}
    return {
        "name": entry.name, "method": entry.method, "dataset": entry.dataset, "unit": entry.unit,
        "settings": cfg.to_dict(), "device": str(device), "precision": args.precision,
        "warmup_seconds": warmup_seconds, "seconds_median": median, "seconds_min": min(times),
        "seconds_max": max(times), "seconds_all": times,
        "per_second": 1.0 / median, "flops": flops, "flops_per_second": flops / median,
        "matmul_flops_per_second": matmul_rate, "efficiency": flops / median / matmul_rate,
        "matmul_flops_per_second_precision": precision_rate, "efficiency_precision": flops / median / precision_rate,
        "peak_memory_bytes": memory.peak_bytes, "reference": entry.reference,
        "environment": environment(), **profiled, **budget_accuracy(entry, cfg, real, args, device),
    }


def cached_experts(entry: Entry, real, cache: Path, device: torch.device) -> Path:
    """The entry's expert trajectories, trained once into ``cache`` (resumed and verified afterwards)."""
    cfg = ExpertConfig(**entry.experts)
    folder = cache / f"{entry.dataset}-{cfg.num_experts}x{cfg.epochs}-subset{cfg.subset}"
    return train_experts(real, cfg, folder, seed=0, device=device, show_progress=False)


def budget_accuracy(entry: Entry, cfg, real, args: argparse.Namespace, device: torch.device) -> dict:
    """Accuracy after ``--accuracy-iterations`` iterations from the seed (one dc-protocol network), or {}."""
    if not args.accuracy_iterations:
        return {}
    cfg = replace(cfg, iterations=args.accuracy_iterations)
    distiller = get_method(entry.method)(real, cfg, seed=0, device=device)
    synset = distill_with(distiller, show_progress=False)
    result = evaluate_synset(synset, real, protocol="dc", epochs=args.accuracy_epochs, num_eval=1, seed=0,
                             device=device)
    return {"budget_iterations": cfg.iterations, "budget_distill_seconds": synset.meta["distill_seconds"],
            "budget_protocol": f"dc, {args.accuracy_epochs} epochs, 1 network",
            "budget_accuracy": result.summary()["accuracy_mean"]}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| entry | unit | s/unit (median) | min–max | GFLOP/unit | achieved GFLOP/s | % of matmul | "
             "peak memory | reference |", "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['name']} | {r['unit']} | {r['seconds_median']:.3f} | {r['seconds_min']:.3f}–"
                     f"{r['seconds_max']:.3f} | {r['flops'] / 1e9:.1f} | {r['flops_per_second'] / 1e9:.1f} | "
                     f"{100 * r['efficiency']:.0f} % | {r['peak_memory_bytes'] / 2**20:.0f} MiB | {r['reference']} |")
    env = rows[0]["environment"] if rows else {}
    rate = rows[0]["matmul_flops_per_second"] / 1e9 if rows else 0
    machine = env.get("cuda") or env.get("processor")
    precision = rows[0].get("precision", "fp32") if rows else "fp32"
    own = rows[0].get("matmul_flops_per_second_precision", 0) / 1e9 if rows else 0
    own_rate = f", {precision} {own:.0f} GFLOP/s" if precision != "fp32" else ""
    lines.append(f"\n{machine}, {env.get('threads')} threads, torch {env.get('torch')}, {precision}; "
                 f"measured fp32 matmul {rate:.0f} GFLOP/s{own_rate}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=os.environ.get("DDLIB_DATA"), help="real data (default $DDLIB_DATA)")
    p.add_argument("--only", nargs="*", default=None, help="entry names (default: all, or the quick ones)")
    p.add_argument("--quick", action="store_true", help="the quick entries, 1 warm-up and 3 timed units")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=list(PRECISION_DTYPES))
    p.add_argument("--out", default="results/bench", help="folder for the JSON files and table.md")
    p.add_argument("--list", action="store_true", help="print the entries and exit")
    p.add_argument("--experts-cache", default="runs/bench-experts", help="where trajectory entries keep experts")
    p.add_argument("--profile", action="store_true", help="also profile one unit: its time by operator kind")
    p.add_argument("--accuracy-iterations", type=int, default=0,
                   help="also distil this many iterations and evaluate (0: timing only)")
    p.add_argument("--accuracy-epochs", type=int, default=300, help="epochs of the budget evaluation network")
    args = p.parse_args(argv)
    if args.list:
        for e in ENTRIES:
            print(f"{e.name:28s} {e.method:8s} {e.dataset:8s} {e.settings}{'  (quick)' if e.quick else ''}")
        return 0
    if args.quick:
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 3)
    names = {e.name for e in ENTRIES}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        p.error(f"unknown entries {unknown}; see --list")
    entries = [e for e in ENTRIES if (e.name in args.only if args.only else (e.quick or not args.quick))]
    device = resolve_device(args.device)
    rate = matmul_flops_per_second(device)
    precision_rate = rate if args.precision == "fp32" else matmul_flops_per_second(
        device, dtype=PRECISION_DTYPES[args.precision])
    print(f"matmul on {device}: fp32 {rate / 1e9:.0f} GFLOP/s, {args.precision} {precision_rate / 1e9:.0f} GFLOP/s",
          flush=True)
    out = Path(args.out)
    rows = []
    for entry in entries:
        row = run_entry(entry, args, rate, precision_rate)
        suffix = "" if args.precision == "fp32" else f"-{args.precision}"
        save_json(row, out / f"{entry.name}{suffix}-{device.type}.json")
        rows.append(row)
        print(f"{entry.name}: {row['seconds_median']:.3f} s/{entry.unit} (min {row['seconds_min']:.3f}), "
              f"{row['flops'] / 1e9:.1f} GFLOP, {100 * row['efficiency']:.0f} % of matmul, "
              f"{row['peak_memory_bytes'] / 2**20:.0f} MiB"
              + (f", {100 * row['budget_accuracy']:.2f} % after {row['budget_iterations']} iterations"
                 if "budget_accuracy" in row else ""), flush=True)
        if "profile" in row:
            print("  time by operator kind: " + ", ".join(f"{k} {100 * v:.0f} %"
                                                          for k, v in row["profile"]["by_kind"].items()), flush=True)
    table = markdown_table(rows)
    atomic_write(out / f"table-{device.type}.md", lambda f: f.write(table), mode="w")
    return 0


if __name__ == "__main__":
    sys.exit(main())
