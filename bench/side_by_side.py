"""The harness shared by the side-by-side benchmarks (``bench.dc_reference``, ``bench.dm_reference``,
``bench.datadam_reference``).

Each of those re-states an official method's loop in plain PyTorch (the official code is not vendored) and
runs it alternately with ddlib's version of the same work, in one process on the same threads, so a change
of load on the other core hits both alike. Timing mode runs ``--repeats`` timed units after one warm-up.
Accuracy mode (``--accuracy-iterations K``) runs K whole iterations of each side from the same initial
images, times every iteration after the first, and evaluates both final sets with one protocol and the same
evaluation seeds (network i starts from the same weights on both sides), so the accuracies are paired.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from ddlib.synset import SyntheticSet
from ddlib.utils import PRECISION_DTYPES

# one unit of a side: run it for repeat ``rep``; a reference side may return named sub-timings (seconds) of
# its own parts; what a ddlib side returns (a step's losses) is ignored
Unit = Callable[[int], "dict[str, float] | None"]


def parser(prog: str, doc: str, *, unit: str, repeats: int) -> argparse.ArgumentParser:
    """The arguments every side-by-side benchmark takes; callers may add their own."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default=None, help="real data (default $DDLIB_DATA)")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--repeats", type=int, default=repeats, help=f"timed {unit}s of each (after one warm-up)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (both sides run on it)")
    p.add_argument("--precision", default="fp32", choices=list(PRECISION_DTYPES),
                   help="ddlib's side only: the official codes run in fp32")
    p.add_argument("--out", default="results/bench")
    p.add_argument("--accuracy-iterations", type=int, default=0,
                   help="accuracy mode: run this many whole iterations of each side, then evaluate both")
    p.add_argument("--eval-protocol", default="dc", help="evaluation protocol of accuracy mode (ddlib.evaluate)")
    p.add_argument("--eval-epochs", type=int, default=300, help="epochs of each evaluation network")
    p.add_argument("--num-eval", type=int, default=5, help="evaluation networks per side")
    return p


def time_alternately(sides: dict[str, Unit], reps: int, warmup: int = 1,
                     device: torch.device | None = None) -> dict[str, list[float]]:
    """Run each side's unit in turn for ``reps`` repeats; seconds per side (and per named part, as
    ``<side>_<part>``, for a unit that returns {part: seconds}) of every repeat after the first ``warmup``.
    On a GPU each unit is timed between two synchronisations, and ``<side>_peak_gib`` holds the peak memory
    it allocated above what was allocated before it (GiB) per repeat."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    cuda = device is not None and device.type == "cuda"
    for rep in range(reps):
        line = []
        for name, unit in sides.items():
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            returned = unit(rep)
            if cuda:
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            # Timed parts are plain floats; a distiller's step returns its loss tensors, which are not timings.
            parts = {k: v for k, v in (returned or {}).items() if isinstance(v, float)}
            line.append(f"{name} {seconds:.2f} s" + "".join(f" ({k} {v:.2f})" for k, v in parts.items()))
            if cuda:
                parts["peak_gib"] = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 30
            if rep >= warmup:
                times[name].append(seconds)
                for key, value in parts.items():
                    times.setdefault(f"{name}_{key}", []).append(value)
        print(f"rep {rep}: " + ", ".join(line), flush=True)
    return times


def paired_accuracy(sets: dict[str, SyntheticSet], real, args: argparse.Namespace) -> dict:
    """Evaluate each set with ``args``' protocol and the same seeds. Returns per-side summaries and whether
    ddlib's mean is at least the reference's mean minus one of its standard deviations (issue 6's bar)."""
    from ddlib.evaluate import evaluate_synset

    out: dict = {"protocol": args.eval_protocol, "epochs": args.eval_epochs, "num_eval": args.num_eval}
    for name, synset in sets.items():
        result = evaluate_synset(synset, real, protocol=args.eval_protocol, epochs=args.eval_epochs,
                                 num_eval=args.num_eval, seed=0)
        out[name] = {k: result.summary()[k] for k in ("accuracy_mean", "accuracy_std", "accuracies")}
        print(f"{name}: {100 * result.accuracy_mean:.2f} ± {100 * result.accuracy_std:.2f} %", flush=True)
    ref, ours = out["reference"], out["ddlib"]
    out["difference"] = ours["accuracy_mean"] - ref["accuracy_mean"]
    out["within_one_std_or_better"] = ours["accuracy_mean"] >= ref["accuracy_mean"] - ref["accuracy_std"]
    return out


def write_report(report: dict, times: dict[str, list[float]], path: Path, unit: str) -> dict:
    """Add the medians and the ddlib/reference ratio to ``report``, write it as JSON and print a summary."""
    from ddlib.io import save_json
    from ddlib.utils import cpu_name, environment

    medians = {k: statistics.median(v) for k, v in times.items() if v}
    report.update(unit=unit, cpu=cpu_name(), environment=environment(), seconds=times, median=medians,
                  ratio_ddlib_to_reference=medians["ddlib"] / medians["reference"])
    save_json(report, path)
    print(f"median s/{unit}: reference {medians['reference']:.2f}, ddlib {medians['ddlib']:.2f} "
          f"(ratio {report['ratio_ddlib_to_reference']:.2f}) -> {path}", flush=True)
    return report


def finish(args: argparse.Namespace, report: dict, times: dict[str, list[float]], *, name: str, unit: str,
           ours, reference_images, real) -> dict:
    """In accuracy mode, evaluate ddlib's set (``ours``, a Distiller) and the reference's images (same labels and
    metadata) with ``paired_accuracy``; then write the report to ``report_path(args, name)``."""
    if args.accuracy_iterations:
        mine = ours.synthetic_set()
        theirs = SyntheticSet(reference_images.detach().clone(), mine.labels, None,
                              {**mine.meta, "method": f"{name}-reference"})
        report["iterations"] = args.accuracy_iterations
        report["accuracy"] = paired_accuracy({"reference": theirs, "ddlib": mine}, real, args)
    return write_report(report, times, report_path(args, name), unit)


def report_path(args: argparse.Namespace, method: str) -> Path:
    """``<out>/<method>-reference-ipc<IPC>[-acc<K>][-<precision>]-<device type>.json``."""
    from ddlib.utils import resolve_device

    suffix = f"-acc{args.accuracy_iterations}" if args.accuracy_iterations else ""
    suffix += f"-{args.precision}" if args.precision != "fp32" else ""
    return Path(args.out) / f"{method}-reference-ipc{args.ipc}{suffix}-{resolve_device(args.device).type}.json"
