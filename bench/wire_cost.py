"""Wire cost of a federated round, measured from the server's real messages.

    .venv/bin/python bench/wire_cost.py                         # default synthetic run
    .venv/bin/python bench/wire_cost.py -- experiment=pneumonia federation.rounds=2

Runs ``simulate.py`` with the given overrides twice, side by side, with
``federation.wire_dtype=float32`` and ``=float16`` (the hospitals' replies
in half precision), and reads the ``wire-bytes-*``
figures the server writes per round into ``metrics.jsonl`` (the train
phase's ``overall`` row): the protobuf size of every message the server
sent and received (see :mod:`common.wire_cost`). Prints per round:

- train bytes: the train messages to the sampled hospitals plus their
  replies (updated weights + metrics); a train message carries the global
  weights + round config, or only their digest to a hospital that holds
  them since the last evaluation (``digest``: how many did; ``resent``: how
  many of those asked for the weights after all and were sent them in
  full, both messages counted);
- the wire ratio: train bytes / (2 x hospitals x model bytes), model bytes
  being the float32 model's elements x 4 (``final_model.pt``);
- evaluate bytes: the evaluate messages (which carry the new global
  weights) and their metric-only replies, and the ratio with them;
- the ratio with evaluation over the steady rounds (2 on: round 1 sends the
  initial weights to train, as no hospital holds them yet) and over the
  whole run;
- the run's headline metric (central test AUC, or overall Dice), and at
  the end float16 / float32: bytes and the metric's change.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def model_bytes(run_dir: Path) -> int:
    """Elements x item size of the run's final global model."""
    state = torch.load(run_dir / "final_model.pt", map_location="cpu", weights_only=True)
    return sum(t.numel() * t.element_size() for t in state.values())


def wire_rows(run_dir: Path) -> list[dict]:
    """The train phase's ``overall`` rows (one per round) with the wire figures."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("phase") == "train" and r.get("hospital") == "overall"]


def headline(run_dir: Path) -> tuple[str, float | None]:
    """``central auc`` when there is a central test set, else ``overall`` auc/dice."""
    summary = json.loads((run_dir / "summary.json").read_text())
    for site in ("central", "overall"):
        for key in ("auc", "dice"):
            if summary.get(site, {}).get(key) is not None:
                return f"{site} {key}", float(summary[site][key])
    return "none", None


def run(overrides: list[str], run_dir: Path) -> None:
    """One simulation to completion (its output discarded)."""
    subprocess.run([sys.executable, "simulate.py", *overrides, f"run_dir={run_dir}"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def total_bytes(row: dict) -> int:
    """A round's bytes, train and evaluate, sent and received."""
    return sum(int(row.get(f"wire-bytes-{phase}-{way}", 0))
               for phase in ("train", "evaluate") for way in ("sent", "received"))


def ratio_with_evaluation(rows: list[dict], size: int) -> float:
    """Bytes of ``rows`` / (2 x hospitals x model bytes) summed over the same rounds."""
    unit = sum(2 * int(r["wire-messages-train-sent"]) * size for r in rows)
    return sum(total_bytes(r) for r in rows) / unit if unit else float("nan")


def report(label: str, run_dir: Path) -> None:
    """Print one run's per-round wire figures."""
    size = model_bytes(run_dir)
    name, value = headline(run_dir)
    print(f"{label}: model {size} bytes (float32 elements x 4); {name} "
          f"{'n/a' if value is None else f'{value:.4f}'}")
    print(f"{'round':>5} {'hospitals':>9} {'digest':>6} {'resent':>6} {'train sent':>11} "
          f"{'train recv':>11} {'ratio':>6} {'eval sent':>10} {'eval recv':>10} "
          f"{'ratio+eval':>10}")
    rows = wire_rows(run_dir)
    for row in rows:
        sent, recv = row["wire-bytes-train-sent"], row["wire-bytes-train-received"]
        esent = row.get("wire-bytes-evaluate-sent", 0)
        erecv = row.get("wire-bytes-evaluate-received", 0)
        count = int(row["wire-messages-train-sent"])
        digest = int(row.get("wire-messages-train-digest", 0))
        resent = int(row.get("wire-messages-train-resent", 0))
        unit = 2 * count * size
        print(f"{row['round']:>5} {count:>9} {digest:>6} {resent:>6} {sent:>11} {recv:>11} "
              f"{(sent + recv) / unit:>6.3f} {esent:>10} {erecv:>10} "
              f"{ratio_with_evaluation([row], size):>10.3f}")
    steady = [r for r in rows if r["round"] > rows[0]["round"]]
    print(f"ratio+eval: steady rounds ({len(steady)}) "
          f"{ratio_with_evaluation(steady, size):.3f}, whole run "
          f"{ratio_with_evaluation(rows, size):.3f}")


def main(argv: list[str]) -> int:
    """Command line: ``[-- overrides...]``; float32 then float16 replies, same overrides."""
    overrides = argv[argv.index("--") + 1:] if "--" in argv else argv
    metrics = {}
    with tempfile.TemporaryDirectory(prefix="medfed-wire-") as tmp:
        for dtype in ("float32", "float16"):
            run_dir = Path(tmp) / dtype
            run([*overrides, f"federation.wire_dtype={dtype}"], run_dir)
            report(f"federation.wire_dtype={dtype}", run_dir)
            metrics[dtype] = (headline(run_dir), wire_rows(run_dir)[-1])
    (name, f32), row32 = metrics["float32"]
    (_, f16), row16 = metrics["float16"]
    received = row16["wire-bytes-train-received"] / row32["wire-bytes-train-received"]
    total = ((row16["wire-bytes-train-sent"] + row16["wire-bytes-train-received"])
             / (row32["wire-bytes-train-sent"] + row32["wire-bytes-train-received"]))
    rounds = total_bytes(row16) / total_bytes(row32)
    print(f"float16 / float32, last round: reply bytes x{received:.3f}, train bytes x{total:.3f}, "
          f"train + evaluate bytes x{rounds:.3f}")
    if f32 is not None and f16 is not None:
        print(f"{name}: float32 {f32:.6f}, float16 {f16:.6f}, change {f16 - f32:+.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
