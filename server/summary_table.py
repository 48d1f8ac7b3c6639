"""The end-of-run summary printed to the terminal (rich tables)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ORDER = ("auc", "accuracy", "sensitivity", "specificity", "dice", "hd95", "loss", "num-examples")
PRIVACY_ORDER = ("epsilon", "delta", "noise-multiplier", "sample-rate", "dp-steps")


MISSING = object()
"""A key a row does not have (printed ``-``; an undefined value prints ``n/a``)."""


def _fmt(value: Any) -> str:
    if value is MISSING:
        return "-"
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"  # undefined (e.g. AUC with one class present)
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.4f}".rstrip("0").rstrip(".") if value != int(value) else f"{value:.0f}"
    return str(value)


def _table(title: str, rows: dict[str, dict[str, Any]], order: tuple[str, ...]) -> Table:
    keys = [k for k in order if any(k in r for r in rows.values())]
    table = Table(title=title)
    table.add_column("")
    for key in keys:
        table.add_column(key, justify="right")
    for name, row in rows.items():
        table.add_row(name, *(_cell(row, k) for k in keys))
    return table


def _cell(row: dict[str, Any], key: str) -> str:
    """A value, with its interval ``[low, high]`` beneath when the row has one."""
    text = _fmt(row.get(key, MISSING))
    low, high = row.get(key + "-ci-low"), row.get(key + "-ci-high")
    if isinstance(low, int | float) and isinstance(high, int | float):
        text += f"\n[{low:.3f}, {high:.3f}]"
    return text


def print_summary(summary: dict[str, Any], *, run_dir: Path, console: Console | None = None,
                  total_s: float | None = None) -> None:
    """Print final metrics per hospital, overall, central test and privacy.

    ``total_s``: the whole command's wall time in seconds, printed with the
    ServerApp's own (``wall_time_s`` of the summary) when given.
    """
    console = console or Console(width=max(Console().width, 120))
    rows = dict(summary.get("hospitals", {}))
    if summary.get("overall"):
        rows["overall (weighted)"] = summary["overall"]
    if summary.get("central"):
        rows["central test set"] = summary["central"]
    if summary.get("test_set"):
        scored = summary.get("scored", {})
        rows[f"test set ({scored.get('num-examples')} samples)"] = summary["test_set"]
    console.print(_table(_title(summary), rows, ORDER))
    _print_threshold(summary, console)
    if summary.get("privacy"):
        console.print(_table("privacy spent per hospital (cumulative over all rounds)",
                             summary["privacy"], PRIVACY_ORDER))
    wall = summary.get("wall_time_s")
    timing = "" if wall is None else f"wall time {wall:.1f} s | "
    if total_s is not None:
        inner = "" if wall is None else f" (the ServerApp {wall:.1f} s)"
        timing = f"wall time {total_s:.1f} s{inner} | "
    console.print(f"{timing}run folder: {run_dir}")


def _title(summary: dict[str, Any]) -> str:
    """What the figures are of: a scoring, a baseline's epochs, or a run's rounds."""
    name = summary.get("experiment")
    if "scored" in summary:
        scored = summary["scored"]
        return f"{name}: scores on {scored.get('path', 'the run data')}"
    if "epochs_trained" in summary:
        return f"{name}: final metrics after {summary['epochs_trained']} epochs"
    chosen = (summary.get("selection") or {}).get("round")
    model = f"model of round {chosen}" if chosen else "final metrics"
    return f"{name}: {model} after {summary.get('rounds')} rounds"


def _print_threshold(summary: dict[str, Any], console: Console) -> None:
    """The decision threshold and the intervals' coverage, under the table."""
    threshold, note = summary.get("threshold"), summary.get("intervals")
    if isinstance(note, dict):
        console.print(f"[low, high]: {note.get('confidence', 0.95):.0%} bootstrap intervals "
                      f"({note.get('resamples')} resamples)", markup=False)
    if isinstance(threshold, dict):
        console.print(f"decision threshold {threshold.get('value')} ({threshold.get('method')}; "
                      f"{threshold.get('chosen_on')})", markup=False)
