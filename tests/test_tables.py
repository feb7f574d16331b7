"""metrics_table and versus: the notebooks' comparison tables and verdicts."""
from __future__ import annotations

import math

from ddlib.evaluate import EvalResult
from ddlib.tables import metrics_table, versus


def _result(accuracies, aucs=()):
    return EvalResult(model="convnet", protocol={"name": "dc"}, accuracies=list(accuracies),
                      balanced_accuracies=[a - 0.01 for a in accuracies], aucs=list(aucs),
                      train_seconds=[2.0, 4.0][:len(accuracies)], num_train_images=100)


def test_rows_in_percent_with_a_protocol_column_and_summaries_accepted():
    a = _result([0.90, 0.92])
    table = metrics_table({"A": a, "B": _result([0.80, 0.80]).summary()}, "dc, 300 epochs")
    assert list(table.columns) == ["protocol", "train images", "accuracy", "± std", "train seconds"]
    assert math.isclose(table.loc["A", "accuracy"], 91.0) and math.isclose(table.loc["A", "± std"], 1.0)
    assert table.loc["B", "train images"] == 100 and math.isclose(table.loc["A", "train seconds"], 3.0)


def test_binary_rows_add_balanced_accuracy_and_auc():
    table = metrics_table({"A": _result([0.70, 0.72], aucs=[0.8, 0.9]), "B": _result([0.6, 0.6])})
    assert list(table.columns) == ["train images", "accuracy", "± std", "balanced accuracy", "AUC", "train seconds"]
    assert math.isclose(table.loc["A", "balanced accuracy"], 70.0) and math.isclose(table.loc["A", "AUC"], 0.85)
    assert math.isnan(table.loc["B", "AUC"])


def test_versus_calls_a_gap_within_one_std_a_tie():
    table = metrics_table({"A": _result([0.90, 0.92]), "B": _result([0.905, 0.905]), "C": _result([0.80, 0.80])})
    assert versus("A", "B", table).startswith("A and B are within one std of each other (+0.50 points, std 1.00")
    assert versus("C", "A", table) == "C is below A by 11.00 points (std 1.00)"
    assert versus("A", "C", table).startswith("A is above C by 11.00")
