"""DP-SGD step cost vs a plain step, measured side by side in one run.

    .venv/bin/python bench/dp_step_cost.py                 # CPU
    .venv/bin/python bench/dp_step_cost.py --device cuda   # a GPU

For the default classifier (cnn, 28x28) and the default U-Net (unet, 64x64)
at batch 16 and 32, each configuration (plain / Opacus DP-SGD in hooks mode)
runs in its own fresh subprocess so peak memories do not mix. Reported: median
step time after warm-up (robust to a busy machine), and peak memory of
the training step (CPU: peak RSS growth over the process after model and
data are built; CUDA: peak allocated), then the ratios DP / plain.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = (("cnn", "classification", [28, 28], [16, 32, 64]),
         ("unet", "segmentation", [64, 64], [16, 32, 64, 128]))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(name: str, batch: int, dp: bool, device: str, steps: int) -> dict[str, float]:
    """Time ``steps`` training steps of one configuration (run in a fresh process)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from client.dp_sgd import make_private, poisson_loader
    from common.config import ModelConfig, PrivacyConfig, TaskConfig
    from common.models import build_model
    from common.training import make_loss

    _, kind, size, channels = next(c for c in CASES if c[0] == name)
    task = TaskConfig(kind=kind, image_size=size)
    dev = torch.device(device)
    model = build_model(task, ModelConfig(name=name, channels=channels), seed=0).to(dev)
    n = batch * (steps + 3)
    x = torch.randn(n, 1, *size)
    y = (torch.randint(0, 2, (n,)) if kind == "classification"
         else torch.randint(0, 2, (n, 1, *size)))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    if dp:
        privacy = PrivacyConfig(mode="dp_sgd", noise_multiplier=1.0)
        dp_round = make_private(model=model, optimizer=optimizer, loader=poisson_loader(loader),
                                noise_multiplier=1.0, max_grad_norm=privacy.max_grad_norm,
                                accountant=privacy.accountant)
        optimizer, loader = dp_round.optimizer, dp_round.loader
    criterion = make_loss(task)
    base_mb = _peak_rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mb = torch.cuda.memory_allocated() / 2**20
    times = []
    for i, (xb, yb) in enumerate(loader):
        if xb.shape[0] == 0:
            continue
        xb, yb = xb.to(dev), yb.to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        optimizer.zero_grad()
        criterion(model(xb), yb).backward()
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - started)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else _peak_rss_mb())
    times.sort()
    return {"step_ms": 1000 * times[len(times) // 2], "peak_mb": peak - base_mb}


def main(argv: list[str]) -> int:
    """Run every case in subprocesses and print the table of ratios."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "BATCH", "DP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        name, batch, dp = args.one
        print(json.dumps(measure(name, int(batch), dp == "1", args.device, args.steps)))
        return 0
    print(f"device {args.device}, {args.steps} timed steps after 2 warm-up steps, "
          "Opacus hooks mode, Poisson sampling")
    print(f"{'model':<6} {'batch':>5} {'plain ms':>9} {'DP ms':>8} {'time x':>7} "
          f"{'plain MB':>9} {'DP MB':>8} {'mem x':>6}")
    for name, *_ in CASES:
        for batch in (16, 32):
            res = {}
            for dp in ("0", "1"):
                out = subprocess.run([sys.executable, __file__, "--device", args.device,
                                      "--steps", str(args.steps), "--one", name, str(batch), dp],
                                     capture_output=True, text=True, check=True)
                res[dp] = json.loads(out.stdout.strip().splitlines()[-1])
            plain, priv = res["0"], res["1"]
            print(f"{name:<6} {batch:>5} {plain['step_ms']:>9.1f} {priv['step_ms']:>8.1f} "
                  f"{priv['step_ms'] / plain['step_ms']:>7.2f} {plain['peak_mb']:>9.1f} "
                  f"{priv['peak_mb']:>8.1f} {priv['peak_mb'] / max(plain['peak_mb'], 1e-6):>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
