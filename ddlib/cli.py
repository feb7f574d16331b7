"""Command-line front end: ``python -m ddlib <command> ...`` (also installed as ``ddlib``).

Each command is a thin wrapper over the same library functions the notebooks call. Bad input ends
with a one-line ``error: ...`` on stderr and exit status 2 (set DDLIB_DEBUG=1 for the traceback).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]

# Settings that make the offline default dataset finish in minutes; a run prints when it uses them.
QUICK_DEFAULTS = {"digits": {"iterations": 200, "batch_real": 64, "eval_epochs": 300}}


# ------------------------------------------------------------------------------------------ parser
def _add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits",
                   help="digits (offline default) | mnist | mhist | cifar10 | imagefolder")
    g.add_argument("--data-root", default=None, help="data folder (default: $DDLIB_DATA, else ./data)")
    g.add_argument("--image-size", type=int, default=None, help="working resolution in pixels (dataset default)")
    g.add_argument("--zca", action="store_true",
                   help="ZCA-whiten the images instead of mean/std (as MTT/DATM/PAD do; C*H*W <= 4096)")


def _add_eval_flags(p: argparse.ArgumentParser, model_flag: bool = True) -> None:
    g = p.add_argument_group("evaluation")
    if model_flag:
        g.add_argument("--model", default="convnet", help="network (see `ddlib models`)")
    g.add_argument("--protocol", default=None, help="dc (1000 epochs, DSA) | dc-aug | course (20 epochs, cosine)")
    g.add_argument("--eval-epochs", type=int, default=None, help="training epochs of each evaluation network")
    g.add_argument("--num-eval", type=int, default=5, help="evaluation networks (mean ± std over them)")
    g.add_argument("--eval-model", default=None, help="evaluate with this network instead of --model")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seeds every random draw of the run")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--out", default=None, help="output folder (synset.pt, metrics.json)")
    g.add_argument("--results", default=None,
                   help="runs table to append to (default: $DDLIB_RESULTS, else results/runs.jsonl; 'off' skips)")


def _add_distill_parser(sub: argparse._SubParsersAction) -> None:
    """``ddlib distill``: the common flags first, then one argument group per family of methods."""
    p = sub.add_parser("distill", help="learn a synthetic set")
    p.add_argument("--method", default="dm",
                   help="dm | datadam | dc | dsa | dd | mtt | datm | pad (all in `ddlib methods`)")
    p.add_argument("--preset", default=None, help="a method's named settings (e.g. course, paper)")
    p.add_argument("--ipc", type=int, default=None, help="synthetic images per class (default 10)")
    p.add_argument("--iterations", type=int, default=None, help="outer iterations (method default)")
    p.add_argument("--init", default=None, help="real | noise | uniform | white | black | grey")
    p.add_argument("--batch-real", type=int, default=None, help="real images per class per iteration")
    p.add_argument("--lr-img", type=float, default=None, help="learning rate of the synthetic images")
    p.add_argument("--no-dsa", action="store_true", help="turn off siamese augmentation in the matching")
    p.add_argument("--precision", default=None, help="fp32 | bf16 | fp16 (autocast of the network passes)")
    p.add_argument("--chunk", type=int, default=None, help="images per network pass (lowers memory; same result)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other method setting, e.g. --set log_every=5")
    g = p.add_argument_group("dm / datadam")
    g.add_argument("--compile", action="store_true",
                   help="dm/datadam: torch.compile the network passes (pays off over long runs; see bench/README)")
    g.add_argument("--power", type=float, default=None, help="datadam: attention power p (paper 4, released code 1)")
    g.add_argument("--mmd-weight", type=float, default=None, help="datadam: lambda, the weight of the embedding MMD")
    g.add_argument("--norm", default=None, help="datadam: the matching network's norm (instance | batch | ...)")
    g = p.add_argument_group("dc / dsa / dd")
    g.add_argument("--distance", default=None, help="dc/dsa: gradient distance, layerwise | mse | cos")
    g.add_argument("--outer-loop", type=int, default=None, help="dc/dsa: outer steps per iteration (IPC table)")
    g.add_argument("--inner-loop", type=int, default=None, help="dc/dsa: inner epochs per outer step (IPC table)")
    g.add_argument("--lr-net", type=float, default=None, help="dc/dsa/dd: lr of the inner network training")
    g.add_argument("--hessian-weight", type=float, default=None,
                   help="dc/dsa: weight of the Hessian-vector-product distance (0 = plain DC)")
    g.add_argument("--hessian-probes", type=int, default=None, help="dc/dsa: Rademacher directions per outer step")
    g = p.add_argument_group("mtt / datm / pad")
    g.add_argument("--experts", default=None, help="folder of expert trajectories (`ddlib experts`)")
    g.add_argument("--syn-steps", type=int, default=None, help="student steps per iteration (N)")
    g.add_argument("--expert-epochs", type=int, default=None, help="expert epochs matched (M)")
    g.add_argument("--max-start-epoch", type=int, default=None, help="upper end of the start epoch")
    g.add_argument("--batch-syn", type=int, default=None, help="synthetic images per student step")
    _add_data_flags(p)
    _add_eval_flags(p)
    _add_run_flags(p)
    p.add_argument("--no-eval", action="store_true", help="only write synset.pt")
    p.add_argument("--no-random-baseline", action="store_true", help="skip the random-subset comparison")
    g = p.add_argument_group("long runs")
    g.add_argument("--checkpoint-every", type=int, default=100,
                   help="iterations between checkpoints in --out (0: only on SIGINT/SIGTERM and at the end)")
    g.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run whose checkpoint.pt is in DIR (its settings come from the checkpoint)")
    g.add_argument("--force", action="store_true",
                   help="take over --out although a lock or an unfinished checkpoint is there")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddlib", description="Dataset distillation: distil, select, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("datasets", help="list datasets and whether they are found under the data root")
    p.add_argument("--data-root", default=None)

    sub.add_parser("models", help="list the registered networks")
    sub.add_parser("methods", help="list the distillation methods and their settings")

    p = sub.add_parser("prepare-mhist", help="unpack the course's MHIST images.zip (or a folder) into <root>/mhist")
    p.add_argument("source", help="images.zip or a folder of MHIST_*.png")
    p.add_argument("--annotations", default=None, help="annotations.csv (default: beside the source)")
    p.add_argument("--data-root", default=None, help="writes <data-root>/mhist/")

    p = sub.add_parser("baseline", help="train on the full training set (the upper bound)")
    _add_data_flags(p)
    _add_eval_flags(p)
    _add_run_flags(p)
    p.set_defaults(num_eval=1, protocol="course")

    p = sub.add_parser("select", help="a coreset baseline: random, herding or k-center")
    p.add_argument("--method", default="random", choices=["random", "herding", "kcenter"])
    p.add_argument("--ipc", type=int, default=10, help="images per class")
    _add_data_flags(p)
    _add_eval_flags(p)
    _add_run_flags(p)
    p.add_argument("--no-eval", action="store_true", help="only write synset.pt")

    _add_distill_parser(sub)

    p = sub.add_parser("experts", help="train expert trajectories for mtt/datm/pad (resumable)")
    _add_data_flags(p)
    p.add_argument("--num-experts", type=int, default=10, help="expert networks (the papers train 100)")
    p.add_argument("--epochs", type=int, default=50, help="epochs per expert (MTT 50, DATM/PAD 100)")
    p.add_argument("--model", default="convnet", help="network (no BatchNorm)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "gsam"], help="sgd (MTT) | gsam (DATM, PAD)")
    p.add_argument("--subset", type=int, default=0, help="real images per class the experts see (0 = all)")
    p.add_argument("--half", action="store_true", help="store the parameters as float16")
    p.add_argument("--curriculum", action="store_true", help="PAD's easy-to-hard schedule over EL2N scores")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other expert setting (ddlib.trajectory.ExpertConfig), e.g. --set lr=0.02")
    _add_run_flags(p)
    p.add_argument("--force", action="store_true", help="take over --out although another process holds its lock")

    p = sub.add_parser("evaluate", help="evaluate a synset.pt file")
    p.add_argument("synset", help="path to synset.pt")
    p.add_argument("--data-root", default=None)
    p.add_argument("--models", default=None, help="comma-separated networks (default: the one it was made with)")
    p.add_argument("--no-random-baseline", action="store_true", help="skip the random-subset comparison")
    _add_eval_flags(p, model_flag=False)
    _add_run_flags(p)

    p = sub.add_parser("info", help="describe a synset.pt file")
    p.add_argument("synset")
    _add_batch_parsers(sub)
    return parser


def _positive(kind):
    """An argparse type: a number of ``kind`` above zero, else a one-line error naming the flag's value."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < math.inf:  # also refuses nan and inf
            raise argparse.ArgumentTypeError(f"must be a {'whole ' if kind is int else ''}number above 0, got {text!r}")
        return value
    return parse


def _add_backend_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="where runs execute (ray: one task each)")
    p.add_argument("--address", default=None,
                   help="ray: cluster address HOST:PORT (default: $RAY_ADDRESS, else a Ray started here)")
    p.add_argument("--cpus-per-run", type=_positive(float), default=1,
                   help="ray: CPUs (and threads) of each run's task")


def _add_batch_parsers(sub) -> None:
    """notebooks run|params, results table|plot, report."""
    nb = sub.add_parser("notebooks", help="run notebooks with papermill (profiles, sweeps) or list their parameters")
    nbsub = nb.add_subparsers(dest="notebooks_command", required=True)
    p = nbsub.add_parser("run", help="execute notebooks in parallel; skip those already run with the same inputs")
    p.add_argument("notebooks", nargs="*", help="paths, stems or number prefixes (default: every numbered notebook)")
    p.add_argument("--profile", default="smoke", help="smoke | course | paper (see notebooks/profiles.yaml)")
    p.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUES"),
                   help="set a parameter; comma-separated values sweep (-p ipc 1,10,50 -p seed 0,1)")
    p.add_argument("-f", "--params-file", default=None, help="YAML file of parameters (over the profile)")
    p.add_argument("--out", default="results/notebooks", help="executed notebooks, logs and status files")
    p.add_argument("--jobs", type=_positive(int), default=1, help="notebooks at once; each gets cores // jobs threads")
    p.add_argument("--cores", type=_positive(int), default=None,
                   help="CPU cores the jobs share (default: those this process may use); leave some to other work")
    p.add_argument("--force", action="store_true", help="run even when an identical run already succeeded")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per notebook")
    p.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    p.add_argument("--notebooks-dir", default=None, help="where numbered notebooks are found (default: ./notebooks)")
    p.add_argument("--results", default=None, help="runs table for the notebooks' rows (default as for distill)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their parameters, run nothing")
    _add_backend_flags(p)
    p = nbsub.add_parser("params", help="a notebook's parameters, defaults and profile values")
    p.add_argument("notebook")
    p.add_argument("--notebooks-dir", default=None)

    p = sub.add_parser("sweep", help="distil every method x IPC x seed, here or on a Ray cluster")
    p.add_argument("--method", required=True, help="comma-separated methods, e.g. dm,datadam")
    p.add_argument("--ipc", default="10", help="comma-separated images per class, e.g. 1,10,50")
    p.add_argument("--seed", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--dataset", default="digits", help="dataset of every run")
    p.add_argument("--iterations", type=int, default=None, help="iterations of every run (method default)")
    p.add_argument("--out", default="runs/sweep", help="one folder per run inside it")
    p.add_argument("--results", default=None, help="runs table (default: $DDLIB_RESULTS, else results/runs.jsonl)")
    p.add_argument("--jobs", type=_positive(int), default=1, help="local backend: runs at once")
    p.add_argument("--gpus-per-run", type=float, default=0, help="ray: GPUs of each run's task")
    p.add_argument("--dry-run", action="store_true", help="print the runs, run nothing")
    _add_backend_flags(p)
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: further `distill` flags for every run")

    res = sub.add_parser("results", help="the runs table: leaderboard and figures")
    rsub = res.add_subparsers(dest="results_command", required=True)
    p = rsub.add_parser("table", help="leaderboard (method x dataset x IPC) beside published numbers")
    p.add_argument("--results", default=None, help="runs table (default: $DDLIB_RESULTS, else results/runs.jsonl)")
    p.add_argument("--dataset", default=None, help="only this dataset")
    p.add_argument("--method", default=None, help="only this method")
    p.add_argument("--format", default="text", choices=["text", "markdown", "latex"])
    p.add_argument("--published", action="store_true", help="also print the published numbers")
    p = rsub.add_parser("import", help="append metrics.json files made before the table (or elsewhere)")
    p.add_argument("paths", nargs="+", help="metrics.json files or folders searched for them")
    p.add_argument("--results", default=None)
    p = rsub.add_parser("plot", help="accuracy vs IPC, vs iteration and vs wall time (PNG)")
    p.add_argument("--results", default=None)
    p.add_argument("--out", default="results/figures", help="folder of the PNG files")
    p.add_argument("--dpi", type=int, default=100, help="resolution (at most 100)")

    p = sub.add_parser("report", help="tables, figures and the ML Reproducibility Checklist for a submission")
    p.add_argument("--out", default="report", help="folder of report.md, report.tex and figures/")
    p.add_argument("--results", default=None, help="runs table (default: $DDLIB_RESULTS, else results/runs.jsonl)")
    p.add_argument("--notebooks", default="results/notebooks", help="folder of executed notebooks and status files")


# ------------------------------------------------------------------------------------------ helpers
def _load(args: argparse.Namespace):
    from ddlib.data import load_dataset

    return load_dataset(args.dataset, root=args.data_root, image_size=args.image_size, zca=args.zca)


def _protocol(args: argparse.Namespace, default: str = "dc"):
    from ddlib.evaluate import get_protocol

    return get_protocol(args.protocol or default, epochs=args.eval_epochs)


def _write_metrics(out: Path | None, metrics: dict[str, Any], args: argparse.Namespace | None = None) -> None:
    from ddlib.io import save_json

    if out is not None:
        save_json(metrics, out / "metrics.json")
        print(f"wrote {out / 'metrics.json'}")
    if args is not None:
        _record_run(metrics, args)


def _record_run(metrics: dict[str, Any], args: argparse.Namespace) -> None:
    """Append the run to the runs table (ddlib.results) with the command line's settings."""
    from ddlib.results import record, results_path

    params = {k: v for k, v in vars(args).items() if k != "results"}
    record(metrics, params, source=f"cli:{args.command}", path=getattr(args, "results", None))
    table = results_path(getattr(args, "results", None))
    if table is not None:
        print(f"appended to {table}")


def _eval_fields(result, prefix: str = "") -> dict[str, Any]:
    s = result.summary()
    keep = ("accuracy_mean", "accuracy_std", "accuracies", "balanced_accuracy_mean", "balanced_accuracy_std",
            "auc_mean", "auc_std", "train_seconds_mean")
    return {prefix + k: s[k] for k in keep if k in s}


def _pct(result) -> str:
    return f"{100 * result.accuracy_mean:6.2f} ± {100 * result.accuracy_std:.2f} %"


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _environment() -> dict[str, Any]:
    from ddlib.utils import environment  # torch is imported only by the commands that need it

    return environment()


# ------------------------------------------------------------------------------------------ commands
def cmd_datasets(args: argparse.Namespace) -> int:
    from ddlib.data import DatasetNotFoundError, list_datasets, load_dataset, resolve_data_root

    root = resolve_data_root(args.data_root)
    print(f"data root: {root}")
    for name in list_datasets():
        if name == "imagefolder":
            print(f"  {name:12s} any <path>/train/<class>/*, <path>/test/<class>/* (give --data-root <path>)")
            continue
        try:
            real = load_dataset(name, root=root)
            counts = real.class_counts.tolist()
            print(f"  {name:12s} found: {real.train_images.shape[0]} train / {real.test_images.shape[0]} test, "
                  f"{real.channels}x{real.image_size}x{real.image_size}, {real.num_classes} classes {counts}")
        except DatasetNotFoundError as exc:
            print(f"  {name:12s} not found ({str(exc).splitlines()[0]})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ddlib.models import list_models

    print("\n".join(list_models()))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from ddlib.methods import get_method, list_methods

    for name in list_methods():
        cls = get_method(name)
        settings = ", ".join(f"{f.name}={f.default!r}" for f in fields(cls.Config))
        presets = ", ".join(sorted(getattr(cls, "PRESETS", {}))) or "none"
        print(f"{name}: presets [{presets}]\n    {settings}")
    return 0


def cmd_prepare_mhist(args: argparse.Namespace) -> int:
    from ddlib.data import prepare_mhist, resolve_data_root

    dest = prepare_mhist(args.source, resolve_data_root(args.data_root) / "mhist", annotations=args.annotations)
    print(f"MHIST ready in {dest}")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from ddlib.evaluate import evaluate_full
    from ddlib.utils import resolve_device

    real = _load(args)
    protocol = _protocol(args, default="course")
    model = args.eval_model or args.model
    print(f"{real.name}: full training set ({real.train_images.shape[0]} images), {model}, {protocol.describe()}")
    result = evaluate_full(real, model=model, protocol=protocol, num_eval=args.num_eval, seed=args.seed,
                           device=resolve_device(args.device))
    print(f"full-data accuracy: {_pct(result)}; {result.train_seconds[0]:.1f} s per network; "
          f"{result.flops_per_image / 1e6:.2f} MFLOP per image (FLOP = 2 x MAC), "
          f"{result.train_flops / 1e12:.2f} TFLOP per training run")
    metrics = {"method": "full", "dataset": real.name, "ipc": None, "model": model, "seed": args.seed,
               "num_eval": args.num_eval, "eval_epochs": protocol.epochs, "protocol": protocol.name,
               **_eval_fields(result), "flops_per_image": result.flops_per_image, "train_flops": result.train_flops,
               "peak_memory_bytes": result.peak_memory_bytes, "environment": _environment()}
    _write_metrics(Path(args.out) if args.out else None, metrics, args)
    return 0


def _evaluate_and_report(synset, real, args, protocol, out: Path | None, extra: dict[str, Any]) -> dict[str, Any]:
    """Evaluate ``synset`` and a random real subset of the same size the same way; print and save both."""
    from ddlib.evaluate import evaluate_synset
    from ddlib.methods.coreset import select_random
    from ddlib.utils import resolve_device

    device = resolve_device(args.device)
    model = args.eval_model or synset.meta.get("config", {}).get("model", "convnet")
    metrics = dict(extra)
    metrics.update(model=model, num_eval=args.num_eval, eval_epochs=protocol.epochs, protocol=protocol.name)
    if not getattr(args, "no_eval", False) and "dd" in synset.meta:
        from ddlib.methods.dd import replay

        replayed = replay(synset, real, num_eval=args.num_eval, seed=args.seed, device=device)
        metrics.update(_eval_fields(replayed, prefix="replay_"))
        print(f"dd replay of the learned steps ({'fixed' if replayed.protocol['fixed_init'] else 'fresh'} "
              f"init): {_pct(replayed)}")
    if not getattr(args, "no_eval", False):
        print(f"evaluating on {model}: {args.num_eval} networks, {protocol.describe()}")
        result = evaluate_synset(synset, real, model=model, protocol=protocol, num_eval=args.num_eval,
                                 seed=args.seed, device=device)
        metrics.update(_eval_fields(result), flops_per_image=result.flops_per_image)
        line = f"{synset.meta.get('method', 'synset')} accuracy: {_pct(result)}"
        if not getattr(args, "no_random_baseline", False) and synset.meta.get("method") != "random":
            ipc = synset.images_per_class
            baseline = select_random(real, ipc, seed=args.seed)
            random_result = evaluate_synset(baseline, real, model=model, protocol=protocol, num_eval=args.num_eval,
                                            seed=args.seed, device=device)
            metrics.update(_eval_fields(random_result, prefix="random_"))
            line += f"   |   random real subset ({ipc}/class): {_pct(random_result)}"
        print(line)
    metrics["environment"] = _environment()
    _write_metrics(out, metrics, args)
    return metrics


def cmd_select(args: argparse.Namespace) -> int:
    from ddlib.methods.coreset import select
    from ddlib.utils import resolve_device

    real = _load(args)
    kwargs = {} if args.method == "random" else {"model": args.model, "device": resolve_device(args.device)}
    synset = select(args.method, real, args.ipc, seed=args.seed, **kwargs)
    out = Path(args.out) if args.out else None
    if out:
        synset.save(out / "synset.pt")
        print(f"wrote {out / 'synset.pt'}")
    extra = {"method": args.method, "dataset": real.name, "ipc": args.ipc, "seed": args.seed}
    _evaluate_and_report(synset, real, args, _protocol(args), out, extra)
    return 0


def _resume_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """For ``--resume DIR``: the checkpoint's config, after setting args' method, seed, dataset, image size
    and --out from it (a flag given with another value is an error). None without --resume; with --out and
    no --resume, refuses to start over an unfinished checkpoint unless --force."""
    from ddlib.checkpoint import CheckpointError, checkpoint_path, with_new_defaults
    from ddlib.io import load_checked
    from ddlib.methods import get_method

    hint = "delete it to start afresh, or resume from another copy"
    if args.resume is None:
        path = checkpoint_path(args.out) if args.out else None
        if path is not None and path.is_file() and not args.force:
            body = load_checked(path, "ddlib.Checkpoint", CheckpointError, hint + " (or pass --force)")
            done, total = body["loop"]["iteration"], body["config"]["iterations"]
            if done < total:
                raise ValueError(f"{args.out} holds an unfinished run ({path}, iteration {done} of {total}); continue "
                                 f"it with --resume {args.out}, or pass --force to start over")
        return None
    if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
        raise ValueError(f"--resume continues in its own folder {args.resume}; drop --out {args.out}")
    args.out = args.resume
    body = load_checked(checkpoint_path(args.resume), "ddlib.Checkpoint", CheckpointError, hint)
    defaults = build_parser().parse_args(["distill"])
    for flag, saved in (("method", body["method"]), ("seed", body["seed"]), ("dataset", body["dataset"]["name"]),
                        ("image_size", body["dataset"]["image_size"]), ("zca", bool(body["dataset"].get("zca"))),
                        ("model", body["config"]["model"])):
        given = getattr(args, flag)
        if given not in (getattr(defaults, flag), saved):
            raise ValueError(f"the checkpoint in {args.resume} is from a run with --{flag.replace('_', '-')} {saved}, "
                             f"not {given}; leave the flag out to resume")
        setattr(args, flag, saved)
    args.device = _resume_device(args.device, body.get("device"))
    print(f"resuming {args.resume}: {body['method']} on {body['dataset']['name']} "
          f"({body['dataset']['image_size']} px), seed {body['seed']}, iteration {body['loop']['iteration']}, "
          f"device {args.device}")
    return with_new_defaults(body["config"], get_method(body["method"]).Config)


def _resume_device(given: str, saved: str | None) -> str:
    """The device a resumed run continues on: ``--device`` when given, else the checkpoint's device type when
    this machine has it (only the same kind of device continues the run bit for bit), else ``auto``."""
    import torch

    if given != "auto" or saved is None:
        return given
    if saved == "cpu" or (saved == "cuda" and torch.cuda.is_available()):
        return saved
    print(f"the run was on {saved}, which this machine lacks: continuing on the auto choice (the result may "
          "differ from an uninterrupted run in the last bits)", file=sys.stderr)
    return given


def _resumed_config(saved: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's config with the command line's overrides of the fields a resume may change;
    overrides of any other field must agree with the checkpoint."""
    from ddlib.checkpoint import FREE_ON_RESUME

    clash = [f"{k}={v!r} (checkpoint: {saved.get(k)!r})" for k, v in overrides.items()
             if v is not None and k not in FREE_ON_RESUME and saved.get(k) != v]
    if clash:
        raise ValueError(f"--resume keeps the run's settings; these differ: {', '.join(clash)}. Only "
                         f"{', '.join(FREE_ON_RESUME)} may change")
    return {**saved, **{k: v for k, v in overrides.items() if v is not None and k in FREE_ON_RESUME}}


def cmd_distill(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ddlib import distributed
    from ddlib.methods import distill, make_config
    from ddlib.utils import resolve_device

    distributed.prefix_output()  # under torchrun: "[rank R/N] " before every line
    resumed = _resume_settings(args)  # --resume: method, seed, dataset and settings from the checkpoint
    real = _load(args)
    overrides = dict(ipc=args.ipc, iterations=args.iterations, init=args.init, batch_real=args.batch_real,
                     lr_img=args.lr_img, model=args.model, precision=args.precision, power=args.power,
                     mmd_weight=args.mmd_weight, norm=args.norm, distance=args.distance,
                     outer_loop=args.outer_loop, inner_loop=args.inner_loop, lr_net=args.lr_net,
                     hessian_weight=args.hessian_weight, hessian_probes=args.hessian_probes,
                     experts=args.experts, syn_steps=args.syn_steps, expert_epochs=args.expert_epochs,
                     max_start_epoch=args.max_start_epoch, chunk=args.chunk, batch_syn=args.batch_syn)
    overrides.update(_parse_sets(args.set))  # --set power=1 must not collide with the None of --power
    if args.no_dsa:
        overrides["dsa"] = False
    if args.compile:
        overrides["compile"] = True
    for key, value in QUICK_DEFAULTS.get(real.name, {}).items():
        flag = "--" + key.replace("_", "-")
        if key == "eval_epochs" and args.eval_epochs is None:
            args.eval_epochs = value
        elif key != "eval_epochs" and overrides.get(key) is None and args.preset is None and resumed is None:
            overrides[key] = value
        else:
            continue
        print(f"{key} = {value} (quick default for {real.name}; pass {flag} to change)")
    cfg = (make_config(args.method, args.preset, **overrides) if resumed is None
           else make_config(args.method, None, **_resumed_config(resumed, overrides)))
    device = distributed.device_for(resolve_device(args.device))
    protocol = _protocol(args)
    print(f"{args.method} on {real.name} ({real.channels}x{real.image_size}x{real.image_size}, "
          f"{real.num_classes} classes), {cfg.ipc} images/class, {cfg.iterations} iterations, {cfg.model}, {device}")
    if resumed is not None and distributed.launch() is not None:
        raise ValueError("--resume is not supported under torchrun yet; resume in a single process")
    ckpt = dict(checkpoint_dir=args.out, checkpoint_every=args.checkpoint_every, resume=resumed is not None)
    if distributed.launch() is not None:  # a sharded rank's state is partial: no checkpoints under torchrun
        if resumed is not None:
            raise ValueError("--resume is not supported under torchrun; resume with a single process")
        ckpt = {}
    synset = distill(args.method, real, cfg, seed=args.seed, device=device, show_progress=distributed.is_main(),
                     **(ckpt if args.out and distributed.launch() is None else {}))  # torchrun: not yet
    if not distributed.is_main():  # under torchrun rank 0 saves, evaluates and records
        print("distilled; rank 0 writes the results")
        return 0
    if args.protocol is None and isinstance(synset.meta.get("protocol"), dict):  # the method's own (datm: batch 128)
        from ddlib.evaluate import Protocol, get_protocol

        protocol = get_protocol(Protocol(**synset.meta["protocol"]), epochs=args.eval_epochs)
    synset.meta["protocol"] = asdict(protocol)
    out = Path(args.out) if args.out else None
    if out:
        synset.save(out / "synset.pt")
        print(f"wrote {out / 'synset.pt'}")
    meta = synset.meta
    print(f"distilled in {meta['distill_seconds']:.1f} s ({meta['seconds_per_iteration']:.3f} s/iteration), "
          f"peak memory {meta['peak_memory_bytes'] / 2**20:.0f} MiB")
    extra = {"method": args.method, "dataset": real.name, "ipc": cfg.ipc, "iterations": cfg.iterations,
             "seed": args.seed, "distill_seconds": meta["distill_seconds"],
             "seconds_per_iteration": meta["seconds_per_iteration"], "peak_memory_bytes": meta["peak_memory_bytes"],
             "device": str(device), "config": cfg.to_dict(), "final_loss": (meta["history"].get("loss") or [None])[-1]}
    _evaluate_and_report(synset, real, args, protocol, out, extra)
    return 0


def cmd_experts(args: argparse.Namespace) -> int:
    from ddlib import distributed
    from ddlib.trajectory import ExpertConfig, train_experts
    from ddlib.utils import resolve_device

    distributed.prefix_output()  # under torchrun: "[rank R/N] " before every line; each rank trains its experts
    if not args.out:
        raise ValueError("experts needs --out DIR (the folder of trajectories; an existing one is resumed)")
    real = _load(args)
    cfg = ExpertConfig(**{**dict(num_experts=args.num_experts, epochs=args.epochs, model=args.model,
                                 optimizer=args.optimizer, subset=args.subset, half=args.half,
                                 curriculum=args.curriculum), **_parse_sets(args.set)})
    print(f"{cfg.num_experts} {cfg.optimizer} experts ({cfg.model}, {cfg.epochs} epochs) on {real.name} -> {args.out}")
    out = train_experts(real, cfg, args.out, seed=args.seed,
                        device=distributed.device_for(resolve_device(args.device)))
    if not distributed.is_main():
        return 0
    index = json.loads((out / "index.json").read_text())
    accuracies = [e["test_accuracy"] for e in index["experts"].values() if "test_accuracy" in e]
    if accuracies:
        print(f"{len(index['experts'])} experts in {out}; final test accuracy "
              f"{100 * sum(accuracies) / len(accuracies):.2f} % on average")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ddlib.data import load_dataset
    from ddlib.evaluate import Protocol, evaluate_synset, get_protocol
    from ddlib.methods.coreset import select_random
    from ddlib.synset import SyntheticSet
    from ddlib.utils import resolve_device

    synset = SyntheticSet.load(args.synset)
    made_for = synset.meta.get("dataset", {})
    name = made_for.get("name")
    if not name:
        raise ValueError(f"{args.synset} does not say which dataset it was made from; it cannot be evaluated")
    real = load_dataset(name, root=args.data_root, image_size=made_for.get("image_size"),
                        zca=bool(made_for.get("zca")))
    stored = synset.meta.get("protocol")
    base = args.protocol or (Protocol(**stored) if isinstance(stored, dict) else "dc")
    protocol = get_protocol(base, epochs=args.eval_epochs)
    models = (args.models or args.eval_model or synset.meta.get("config", {}).get("model", "convnet")).split(",")
    device = resolve_device(args.device)
    random_set = None if args.no_random_baseline else select_random(real, synset.images_per_class, seed=args.seed)
    rows = {}
    for model in models:
        kw = dict(model=model, protocol=protocol, num_eval=args.num_eval, seed=args.seed, device=device)
        result = evaluate_synset(synset, real, **kw)
        rows[model] = {**_eval_fields(result), "flops_per_image": result.flops_per_image}
        line = f"{model:12s} {_pct(result)}"
        if random_set is not None:
            baseline = evaluate_synset(random_set, real, **kw)
            rows[model].update(_eval_fields(baseline, prefix="random_"))
            line += f"   random real subset {_pct(baseline)}"
        print(line)
    meta = synset.meta
    metrics = {"synset": str(args.synset), "method": meta.get("method"), "dataset": name,
               "ipc": synset.images_per_class, "iterations": meta.get("iterations"), "seed": args.seed,
               "num_eval": args.num_eval, "eval_epochs": protocol.epochs, "protocol": protocol.name,
               "distill_seconds": meta.get("distill_seconds"),
               "seconds_per_iteration": meta.get("seconds_per_iteration"),
               "peak_memory_bytes": meta.get("peak_memory_bytes"), "models": rows}
    metrics.update(model=models[0], **rows[models[0]])  # the first model's numbers at the top level
    metrics["environment"] = _environment()
    _write_metrics(Path(args.out) if args.out else None, metrics, args)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ddlib.synset import SyntheticSet

    synset = SyntheticSet.load(args.synset)
    meta = synset.meta
    data = meta.get("dataset", {})
    print(f"{args.synset}: {len(synset)} images {tuple(synset.images.shape[1:])}, "
          f"{synset.images_per_class} per class, {'soft' if synset.soft_labels else 'hard'} labels"
          + (f", learned lr {synset.lr.flatten()[:4].tolist()}" if synset.lr is not None else ""))
    print(f"  dataset: {data.get('name')} ({data.get('num_classes')} classes, mean {data.get('mean')}, "
          f"std {data.get('std')}, zca {data.get('zca')})")
    print(f"  method: {meta.get('method')}, seed {meta.get('seed')}, iterations {meta.get('iterations')}")
    for key, value in (meta.get("config") or {}).items():
        print(f"    {key} = {value}")
    history = meta.get("history") or {}
    if history.get("loss"):
        print(f"  loss: {history['loss'][0]:.4g} -> {history['loss'][-1]:.4g}")
    if "seconds_per_iteration" in meta:
        print(f"  {meta['seconds_per_iteration']:.3f} s/iteration on {meta.get('device')}")
    return 0


def cmd_notebooks(args: argparse.Namespace) -> int:
    from ddlib import notebooks as nbr
    from ddlib.results import repo_root

    checkout = Path(__file__).resolve().parents[1] / "notebooks"  # when run outside the repository
    folder = Path(args.notebooks_dir) if args.notebooks_dir else repo_root() / "notebooks"
    folder = folder if folder.exists() or args.notebooks_dir else checkout
    if args.notebooks_command == "params":
        print(nbr.describe_parameters(nbr.find_notebooks([args.notebook], folder)[0]))
        return 0
    import yaml

    cfg = nbr.RunnerConfig(out=Path(args.out), profile=args.profile, jobs=args.jobs, force=args.force,
                           kernel=args.kernel, timeout=args.timeout, results=args.results, backend=args.backend,
                           cores=args.cores, address=args.address, cpus_per_run=max(1, int(args.cpus_per_run)))
    file_params = yaml.safe_load(Path(args.params_file).read_text()) if args.params_file else None
    if file_params is not None and not isinstance(file_params, dict):
        raise ValueError(f"{args.params_file} must map parameter names to values")
    runs = nbr.plan(nbr.find_notebooks(args.notebooks, folder), cfg, file_params, [tuple(p) for p in args.param])
    if args.dry_run:
        for run in runs:
            print(f"{run.name}: {json.dumps(run.params, default=str)}")
        return 0
    statuses = nbr.run_all(runs, cfg)
    nbr.clean_tmp(cfg.out)
    failed = [s["name"] for s in statuses if s["status"] == "failed"]
    if failed:
        print(f"{len(failed)} of {len(statuses)} run(s) failed: {', '.join(failed)} (see their .log files)",
              file=sys.stderr)
    return 1 if failed else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from ddlib.sweep import SweepConfig, plan_sweep, run_sweep

    def values(text: str, kind=str) -> list:
        return [kind(v) for v in text.split(",") if v.strip()]

    cfg = SweepConfig(methods=values(args.method), ipcs=values(args.ipc, int), seeds=values(args.seed, int),
                      dataset=args.dataset, iterations=args.iterations, extra=[a for a in args.extra if a != "--"],
                      out=Path(args.out),
                      results=args.results, backend=args.backend, address=args.address, jobs=args.jobs,
                      cpus=args.cpus_per_run, gpus=args.gpus_per_run)
    if args.dry_run:
        for run in plan_sweep(cfg):
            print(f"{run.name}: ddlib distill {' '.join(run.argv)}")
        return 0
    statuses = run_sweep(cfg)
    failed = [s["name"] for s in statuses if s["status"] != "ok"]
    print(f"{len(statuses) - len(failed)} of {len(statuses)} run(s) ok" + (f"; failed: {', '.join(failed)}" if failed
                                                                          else ""))
    return 1 if failed else 0


def cmd_results(args: argparse.Namespace) -> int:
    from ddlib import results as res

    if args.results_command == "import":
        files = res.import_metrics(args.paths, args.results)
        print(f"imported {len(files)} run(s) into {res.results_path(args.results)}")
        return 0
    rows = res.read_rows(args.results)
    if not rows:
        print(f"no runs recorded in {res.results_path(args.results)}")
    if args.results_command == "plot":
        for path in res.plot_all(rows, args.out, dpi=args.dpi):
            print(f"wrote {path}")
        return 0
    board = res.leaderboard(rows)
    if args.dataset:
        board = board[board["dataset"] == args.dataset]
    if args.method:
        board = board[board["method"] == args.method]
    tables = [res.display_rows(board)]
    if args.published:
        tables.append(res.published_cells(args.dataset))
    render = {"text": res.format_table, "markdown": res.markdown_table, "latex": res.latex_table}[args.format]
    print("\n\n".join(render(h, c) for h, c in tables))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ddlib.report import build_report

    for path in build_report(Path(args.out), results=args.results, notebooks=Path(args.notebooks)):
        print(f"wrote {path}")
    return 0


COMMANDS = {"datasets": cmd_datasets, "models": cmd_models, "methods": cmd_methods,
            "prepare-mhist": cmd_prepare_mhist, "baseline": cmd_baseline, "select": cmd_select,
            "distill": cmd_distill, "experts": cmd_experts, "evaluate": cmd_evaluate, "info": cmd_info,
            "notebooks": cmd_notebooks, "sweep": cmd_sweep,
            "results": cmd_results, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a log file as they happen
    from ddlib.errors import USER_ERRORS

    try:
        with _output_lock(args):
            return COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        if os.environ.get("DDLIB_DEBUG"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"interrupted: {exc}" if str(exc) else "interrupted", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)
    except RuntimeError as exc:
        if not _out_of_memory(exc) or os.environ.get("DDLIB_DEBUG"):
            raise
        print(f"error: {OOM_HINT.format(command=args.command)}", file=sys.stderr)
        return 2


OOM_HINT = ("the GPU ran out of memory during `{command}`; lower it with --batch-real B (real images per class), "
            "--chunk N (images per network pass, same result), --batch-syn N (mtt/datm/pad) or --precision bf16, "
            "or run on --device cpu; a run with --out resumes from its last checkpoint with --resume")


def _out_of_memory(exc: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error, without importing torch for commands that do not."""
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch is not None else None
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


def _output_lock(args: argparse.Namespace):
    """The lock on ``--out`` (or ``--resume``) of commands that write a run folder; a null context otherwise."""
    from contextlib import nullcontext

    folder = (getattr(args, "resume", None) or args.out) if args.command in LOCKED_COMMANDS else None
    if not folder or os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 owns the folder
        return nullcontext()
    from ddlib.checkpoint import RunLock

    return RunLock(folder, force=getattr(args, "force", False))


LOCKED_COMMANDS = ("distill", "experts")
