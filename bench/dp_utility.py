"""What DP-SGD costs in model quality, measured side by side in one run.

    .venv/bin/python bench/dp_utility.py                    # pneumonia vs pneumonia_dp
    .venv/bin/python bench/dp_utility.py brain_mri          # brain_mri vs brain_mri_dp

Runs the federated simulation of an experiment without and with sample-level
DP-SGD (the ``<name>_dp`` preset: epsilon 8, delta 1e-5 per hospital), each as
a fresh process, and prints the headline metric of both, their ratio, and
every hospital's final epsilon.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = {"pneumonia": ("central", "auc"), "brain_mri": ("overall", "dice")}


def run(experiment: str, run_dir: Path, overrides: list[str]) -> tuple[dict, float]:
    """One simulation; its summary and wall time in seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "simulate.py", f"experiment={experiment}",
                    f"run_dir={run_dir}", *overrides], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "summary.json").read_text()), time.perf_counter() - started


def main(argv: list[str]) -> int:
    """Command line: experiment names, then ``--`` and shared overrides."""
    split = argv.index("--") if "--" in argv else len(argv)
    experiments = argv[:split] or ["pneumonia"]
    overrides = argv[split + 1:]
    with tempfile.TemporaryDirectory(prefix="medfed-dp-") as tmp:
        for name in experiments:
            section, metric = HEADLINE[name]
            plain, plain_s = run(name, Path(tmp) / name, overrides)
            private, private_s = run(f"{name}_dp", Path(tmp) / f"{name}_dp", overrides)
            a, b = float(plain[section][metric]), float(private[section][metric])
            print(f"\n== {name}: {section} {metric} ==")
            print(f"non-DP {a:.4f} ({plain_s:.0f} s) | DP-SGD {b:.4f} ({private_s:.0f} s) | "
                  f"DP / non-DP {b / a:.3f}")
            for hospital, p in sorted(private["privacy"].items()):
                print(f"  {hospital}: epsilon {p['epsilon']:.3f} at delta {p['delta']:g} "
                      f"(noise multiplier {p['noise-multiplier']:.3f}, sample rate "
                      f"{p['sample-rate']:.4f}, {int(p['dp-steps'])} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
