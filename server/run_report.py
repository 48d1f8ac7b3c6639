"""``report.html``: a self-contained page about one run folder (plots embedded as PNG).

    python -m server.report RUN_DIR      # rebuild it

Sections: the configuration (``config.yaml``), per-round curves per
hospital from ``metrics.jsonl``, epsilon over rounds (DP runs), the final
per-hospital table with confidence intervals and the chosen threshold from
``summary.json``, model selection, and pictures of the central test set from
``central_predictions.npz`` (ROC, calibration and confusion matrix for
classification; slices with true and predicted masks for segmentation).
No picture is derived from a hospital's data: every ``<img>`` carries
``data-source="metrics"`` or ``data-source="central-test"``. matplotlib is
imported only when a report is built.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from common import wire
from common.logs import medfed_logger
from server.report import METRICS_FILE, SUMMARY_FILE, atomic_write_text

REPORT_FILE = "report.html"
PREDICTIONS_FILE = "central_predictions.npz"
CLINICAL = ("auc", "accuracy", "sensitivity", "specificity", "dice", "hd95")
HEADLINE = {"classification": "auc", "segmentation": "dice"}
STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1100px}"
         "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
         "padding:3px 8px;text-align:right}th{background:#eee}pre{background:#f6f6f6;"
         "padding:1em;font-size:12px;max-height:400px;overflow:auto}img{margin:4px}")

log = medfed_logger()


def _read_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _img(data: str, source: str, alt: str) -> str:
    return (f'<img data-source="{source}" alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{data}">')


def _series(rows: list[dict[str, Any]], phase: str, key: str, *, overall: bool = True
            ) -> dict[str, list[tuple[int, float]]]:
    """hospital -> [(round, value)] of ``key`` in ``phase`` rows (a repeated round: last)."""
    out: dict[str, dict[int, float]] = {}
    for row in rows:
        value = row.get(key)
        if row.get("phase") != phase or not isinstance(value, int | float) or "error" in row:
            continue
        if overall or row.get("hospital") != "overall":
            out.setdefault(str(row["hospital"]), {})[int(row["round"])] = float(value)
    return {name: sorted(points.items()) for name, points in out.items()}


def _curves(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """Training loss, federated test metric, validation metric, epsilon over rounds."""
    from server import plots

    kind = summary.get("task", "classification")
    key = HEADLINE.get(kind, "loss")
    selection = summary.get("selection") or {}
    chosen = selection.get("round")
    val_key = selection.get("metric") or f"{wire.VALIDATION_PREFIX}{key}"
    test = _series(rows, "evaluate", key)
    central = _series(rows, "central", key)
    if central:
        test["central"] = next(iter(central.values()))
    wanted = [(_series(rows, "train", wire.TRAIN_LOSS), "training loss", "train loss"),
              (test, f"federated test {key} (central dashed)", key),
              (_series(rows, "evaluate", val_key), f"validation {val_key}", val_key),
              ({**_series(rows, "train", wire.EPSILON, overall=False),
                **_series(rows, "privacy", wire.EPSILON)}, "epsilon spent per hospital",
               "epsilon")]
    parts = [_img(plots.round_curves(series, title=title, ylabel=label, selected_round=chosen),
                  "metrics", title) for series, title, label in wanted if series]
    if not parts:
        return "<p>No per-round metrics (no metrics.jsonl rows).</p>"
    return "\n".join(parts)


def _cell(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    if not isinstance(value, int | float):
        return "n/a"
    if key not in CLINICAL:
        return f"{value:.4g}"
    low, high = metrics.get(f"{key}-ci-low"), metrics.get(f"{key}-ci-high")
    ci = (f"[{low:.3f}, {high:.3f}]" if isinstance(low, int | float)
          and isinstance(high, int | float) else "[n/a]")
    return f"{value:.3f} {ci}"


def _table(summary: dict[str, Any]) -> str:
    """Final test metrics per hospital, overall and central, with intervals."""
    rows = dict(summary.get("hospitals") or {})
    for name in ("overall", "central"):
        if summary.get(name):
            rows[name] = summary[name]
    present = {k for m in rows.values() for k in m}
    columns = [k for k in CLINICAL if k in present] + [
        k for k in ("loss", wire.NUM_EXAMPLES) if k in present]
    if not rows:
        return "<p>No test metrics in summary.json.</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(f"<tr><th>{html.escape(name)}</th>"
                   + "".join(f"<td>{_cell(m, c)}</td>" for c in columns) + "</tr>"
                   for name, m in rows.items())
    intervals = summary.get("intervals")
    note = ("" if not intervals else f"<p>Intervals: {html.escape(json.dumps(intervals))}</p>")
    return f"<table><tr><th>hospital</th>{head}</tr>{body}</table>{note}"


def _pairs(values: dict[str, Any]) -> str:
    """A two-column table of a small dict (nested values as JSON)."""
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v))}</td>"
                    "</tr>" for k, v in values.items())
    return f"<table>{cells}</table>"


def _threshold(summary: dict[str, Any]) -> float:
    chosen = summary.get("threshold")
    value = chosen.get("value") if isinstance(chosen, dict) else None
    return float(value) if isinstance(value, int | float) else 0.5


def _class_names(run_dir: Path, classes: int) -> list[str]:
    """Class names from the exported model's metadata, else ``class k``."""
    metadata = run_dir / "model" / "configs" / "metadata.json"
    try:
        names = json.loads(metadata.read_text()).get("class_names")
    except (OSError, ValueError, AttributeError):
        names = None
    if isinstance(names, list) and len(names) == classes:
        return [str(n) for n in names]
    return [f"class {k}" for k in range(classes)]


def _classification(run_dir: Path, data: Any, summary: dict[str, Any]) -> str:
    from server import plots

    probs = np.asarray(data["probs"], dtype=np.float64)
    labels = np.asarray(data["labels"], dtype=np.int64)
    classes = probs.shape[1]
    names = _class_names(run_dir, classes)
    if classes == 2:
        threshold = _threshold(summary)
        predicted = (probs[:, 1] >= threshold).astype(np.int64)
        caption = f"Confusion matrix at threshold {threshold:.3f}"
    else:
        predicted, caption = probs.argmax(axis=1), "Confusion matrix (most probable class)"
    matrix = plots.confusion_counts(predicted, labels, classes)
    return "\n".join([
        _img(plots.roc_figure(probs, labels, names), "central-test", "ROC curve"),
        _img(plots.calibration_figure(probs, labels), "central-test", "calibration curve"),
        _img(plots.confusion_figure(matrix, names, caption=caption), "central-test", caption),
        f"<p>{len(labels)} central test images.</p>"])


def _central(run_dir: Path, summary: dict[str, Any]) -> str:
    """The central-test pictures, or why there are none."""
    from server import plots

    path = run_dir / PREDICTIONS_FILE
    if not path.is_file():
        return (f"<p>No {PREDICTIONS_FILE} in the run folder (no central test set, or the run "
                "did not write it): no central-test pictures.</p>")
    with np.load(path) as data:
        if "probs" in data:
            return _classification(run_dir, data, summary)
        picture = plots.slices_figure(np.asarray(data["images"], dtype=np.float32),
                                      np.asarray(data["truth"]), np.asarray(data["pred"]))
    return _img(picture, "central-test", "central-test slices with true and predicted masks")


def build_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` from the run folder's files; returns its path.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``summary.json``.
    """
    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path}: no summary.json; is {run_dir} a run folder?")
    summary = json.loads(summary_path.read_text())
    config = run_dir / "config.yaml"
    config_text = config.read_text() if config.is_file() else "(no config.yaml)"
    threshold = summary.get("threshold")
    sections = [
        ("Final test metrics (95 % intervals in brackets)", _table(summary)),
        ("Decision threshold", _pairs(threshold) if isinstance(threshold, dict) else
         "<p>none chosen: 0.5 is used.</p>"),
        ("Model selection", _pairs(summary.get("selection") or {"selection": "n/a"})),
        ("Per-round curves (aggregate numbers only)", _curves(_read_rows(run_dir), summary)),
        ("Central test set", _central(run_dir, summary)),
        ("Configuration (config.yaml)", f"<pre>{html.escape(config_text)}</pre>")]
    title = html.escape(f"MedFed run report: {summary.get('experiment', run_dir.name)}")
    body = "".join(f"<h2>{h}</h2>\n{content}\n" for h, content in sections)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{STYLE}</style></head><body><h1>{title}</h1>"
            f"<p>Task {html.escape(str(summary.get('task')))}, {summary.get('rounds')} rounds, "
            f"wall time {summary.get('wall_time_s')} s, folder {html.escape(str(run_dir))}.</p>"
            f"{body}</body></html>\n")
    out = run_dir / REPORT_FILE
    atomic_write_text(out, page)
    return out


def write_report_safely(run_dir: Path) -> Path | None:
    """:func:`build_report`, logging a failure as a warning instead of raising it."""
    try:
        path = build_report(run_dir)
    except Exception as err:  # noqa: BLE001 - a report must never fail the run
        log.warning("[MedFed] report.html not written: %s: %s", type(err).__name__, err)
        return None
    log.info("[MedFed] run report: %s", path)
    return path
