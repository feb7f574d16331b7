"""Evaluation results as the notebooks show them: one table row per evaluated set, and a one-line verdict
comparing two rows that calls a gap within one standard deviation a tie."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["metrics_table", "versus"]


def metrics_table(results: Mapping[str, Any], protocol: str | None = None):
    """A DataFrame with one row per entry of ``results`` (name -> EvalResult or its ``summary()`` dict).

    Columns: ``protocol`` (when given), ``train images``, ``accuracy`` and ``± std`` (percent), ``balanced
    accuracy`` (percent) and ``AUC`` for rows of a binary task (those whose summary carries an AUC), and
    ``train seconds`` (mean per network).
    """
    import pandas as pd  # pandas is slow to import and only tables need it

    rows = {}
    for name, result in results.items():
        s = result.summary() if hasattr(result, "summary") else result
        row = {} if protocol is None else {"protocol": protocol}
        row.update({"train images": s["num_train_images"], "accuracy": 100 * s["accuracy_mean"],
                    "± std": 100 * s["accuracy_std"]})
        if "auc_mean" in s:
            row.update({"balanced accuracy": 100 * s["balanced_accuracy_mean"], "AUC": s["auc_mean"]})
        row["train seconds"] = s["train_seconds_mean"]
        rows[name] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    ordered = [c for c in ("protocol", "train images", "accuracy", "± std", "balanced accuracy", "AUC",
                           "train seconds") if c in table]
    return table[ordered]


def versus(a: str, b: str, table) -> str:
    """A sentence comparing rows ``a`` and ``b`` of a :func:`metrics_table`: the accuracy gap in points, or a
    tie when the gap is within the larger of the two standard deviations."""
    gap = table.loc[a, "accuracy"] - table.loc[b, "accuracy"]
    noise = max(table.loc[a, "± std"], table.loc[b, "± std"])
    if abs(gap) <= noise:
        return f"{a} and {b} are within one std of each other ({gap:+.2f} points, std {noise:.2f})"
    return f"{a} is {'above' if gap > 0 else 'below'} {b} by {abs(gap):.2f} points (std {noise:.2f})"
