"""MTT's student steps as one pass over the synthetic batch vs cache-sized slices, alternated on one machine.

    python -m bench.mtt_chunks --data-root ../shared/data --experts runs/experts_mnist_sgd_s1000_e12

Each side runs whole MTT iterations (N unrolled student steps and the backward through them) on the same
distiller; only ``chunk`` differs (images per network pass: the batch, or 0 = ``utils.CPU_PASS_IMAGES``).
The gradient is the same either way (``tests/test_mtt.py``); this measures the time.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from bench.side_by_side import time_alternately
from ddlib.data import load_dataset
from ddlib.io import save_json
from ddlib.methods import get_method, make_config
from ddlib.utils import cpu_name


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.mtt_chunks", description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None, help="real MNIST (default $DDLIB_DATA)")
    p.add_argument("--experts", required=True, help="an MNIST ConvNet-3 expert folder (`ddlib experts`)")
    p.add_argument("--syn-steps", type=int, default=10)
    p.add_argument("--batch-syn", type=int, default=100)
    p.add_argument("--expert-epochs", type=int, default=1)
    p.add_argument("--max-start-epoch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/bench/trajectory-chunks/mtt-chunks-cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    real = load_dataset("mnist", root=args.data_root)
    cfg = make_config("mtt", experts=args.experts, ipc=10, iterations=args.repeats, syn_steps=args.syn_steps,
                      expert_epochs=args.expert_epochs, max_start_epoch=args.max_start_epoch,
                      batch_syn=args.batch_syn, lr_img=100.0)
    distiller = get_method("mtt")(real, cfg, seed=0)

    def side(chunk: int):
        def unit(rep: int) -> None:
            distiller.cfg = dataclasses.replace(cfg, chunk=chunk)
            distiller.step(rep)
        return unit

    whole = args.batch_syn or distiller.images.shape[0]
    times = time_alternately({"whole_batch": side(whole), "slices": side(0)}, args.repeats, warmup=0)
    medians = {k: statistics.median(v) for k, v in times.items()}
    report = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
              "settings": {k: v for k, v in vars(args).items() if k not in ("data_root", "out")},
              "slice_images": distiller.chunk_size(whole), "seconds": times, "median_seconds": medians,
              "ratio_slices_to_whole": medians["slices"] / medians["whole_batch"]}
    save_json(report, args.out)
    print(f"whole batch {medians['whole_batch']:.2f} s, slices {medians['slices']:.2f} s per iteration "
          f"({report['ratio_slices_to_whole']:.2f}x) -> {args.out}")
    return report


if __name__ == "__main__":
    main()
