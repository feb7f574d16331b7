"""Run ddlib commands one after another in one torchrun launch (used by test_distributed.py).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/torchrun_job.py '[["distill", ...], ...]'
"""
import json
import sys

from ddlib.cli import main

if __name__ == "__main__":
    for argv in json.loads(sys.argv[1]):
        code = main(argv)
        if code:
            sys.exit(code)
