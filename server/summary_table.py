"""The end-of-run summary printed to the terminal (rich tables)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ORDER = ("auc", "accuracy", "sensitivity", "specificity", "dice", "hd95", "loss", "num-examples")
PRIVACY_ORDER = ("epsilon", "delta", "noise-multiplier", "sample-rate", "dp-steps")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
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
        table.add_row(name, *(_fmt(row.get(k)) for k in keys))
    return table


def print_summary(summary: dict[str, Any], *, run_dir: Path, console: Console | None = None
                  ) -> None:
    """Print final metrics per hospital, overall, central test and privacy."""
    console = console or Console(width=max(Console().width, 120))
    rows = dict(summary.get("hospitals", {}))
    if summary.get("overall"):
        rows["overall (weighted)"] = summary["overall"]
    if summary.get("central"):
        rows["central test set"] = summary["central"]
    console.print(_table(f"{summary.get('experiment')}: final metrics after "
                         f"{summary.get('rounds')} rounds", rows, ORDER))
    if summary.get("privacy"):
        console.print(_table("privacy spent per hospital (cumulative over all rounds)",
                             summary["privacy"], PRIVACY_ORDER))
    console.print(f"wall time {summary.get('wall_time_s', 0):.1f} s | run folder: {run_dir}")
