"""The command line: round trips through files, and one-line errors on bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ddlib.cli import main
from ddlib.synset import SyntheticSet


def test_distill_evaluate_info_round_trip(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["distill", "--method", "dm", "--dataset", "digits", "--image-size", "8", "--ipc", "1",
                 "--iterations", "4", "--batch-real", "8", "--num-eval", "1", "--eval-epochs", "5",
                 "--device", "cpu", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "random real subset" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("method", "dataset", "ipc", "model", "iterations", "seed", "accuracy_mean", "accuracy_std",
                "num_eval", "eval_epochs", "protocol", "distill_seconds", "seconds_per_iteration",
                "peak_memory_bytes", "flops_per_image", "random_accuracy_mean", "random_accuracy_std"):
        assert key in metrics, key
    assert 0 <= metrics["accuracy_mean"] <= 1 and metrics["iterations"] == 4
    synset = SyntheticSet.load(out / "synset.pt")
    assert synset.images.shape == (10, 1, 8, 8) and synset.meta["protocol"]["epochs"] == 5

    assert main(["evaluate", str(out / "synset.pt"), "--models", "convnet,mlp", "--num-eval", "1",
                 "--eval-epochs", "3", "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(ev["models"]) == {"convnet", "mlp"}
    assert ev["iterations"] == 4 and "random_accuracy_mean" in ev and ev["model"] == "convnet"
    assert main(["info", str(out / "synset.pt")]) == 0
    assert "dm" in capsys.readouterr().out


def test_select_writes_a_synset(tmp_path):
    assert main(["select", "--method", "herding", "--dataset", "digits", "--image-size", "8", "--ipc", "2",
                 "--no-eval", "--out", str(tmp_path)]) == 0
    assert SyntheticSet.load(tmp_path / "synset.pt").images_per_class == 2


@pytest.mark.parametrize("argv, message", [
    (["distill", "--dataset", "nope"], "nope"),
    (["distill", "--dataset", "mnist", "--data-root", "/nonexistent"], "/nonexistent"),
    (["distill", "--dataset", "digits", "--ipc", "100000", "--iterations", "1"], "--ipc"),
    (["distill", "--dataset", "digits", "--init", "plaid", "--iterations", "1"], "plaid"),
    (["evaluate", "/nonexistent/synset.pt"], "no synthetic set"),
    (["distill", "--dataset", "digits", "--set", "bogus=1"], "bogus"),
])
def test_bad_input_is_one_line_without_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err and "Traceback" not in err


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "ddlib", "methods"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "dm" in done.stdout
