"""What DP-SGD costs per training step: time and peak memory, DP vs plain, side by side.

    .venv/bin/python bench/dp_cost.py                  # CPU, the four default cases
    .venv/bin/python bench/dp_cost.py --device cuda    # on a GPU
    .venv/bin/python bench/dp_cost.py --profile unet 32  # top operators of one DP step

Cases: the default classifier (cnn, 28x28, channels [16, 32, 64]) and the
default U-Net (unet, 64x64, channels [16, 32, 64]), at batch 16 and 32,
each trained with a plain torch loop and with MedFed's DP-SGD round
(:func:`client.privacy.start_dp_round`: Opacus hooks mode, Poisson sampling
with the same expected batch size, per-sample clipping, noise, accounting).
Every configuration runs in its own fresh subprocess so peaks never mix.

Reported per configuration (the fastest of ``--repeat`` fresh runs, plain and
DP interleaved), over ``--steps`` timed steps after ``--warmup``:
mean step time and its split into forward (+ loss), backward and optimizer
step (DP: per-sample clipping, noise, accounting); and the peak memory of
the timed steps above the memory held just before them (model, optimizer
state and data included in that base). CPU: after the warm-up, freed heap is
handed back (``malloc_trim``) and the kernel's RSS high-water mark is reset
(``/proc/self/clear_refs``); peak = ``VmHWM`` after the steps minus ``VmRSS``
before them. CUDA: ``max_memory_allocated`` minus ``memory_allocated``. Ratios are DP / plain.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CASES: dict[str, tuple[str, list[int], list[int]]] = {
    "cnn": ("classification", [28, 28], [16, 32, 64]),
    "unet": ("segmentation", [64, 64], [16, 32, 64]),
}
BATCHES = (16, 32)


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as handle:
        line = next(x for x in handle if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024.0


def _reset_peak_rss() -> float:
    """Hand freed heap back to the OS, reset the RSS high-water mark; returns RSS now (MB)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:  # Linux >= 4.0: VmHWM := VmRSS
        handle.write("5")
    return _status_mb("VmRSS")


def _setup(name: str, batch: int, dp: bool, device: str, batches: int,
           physical: int | None = None) -> tuple[Any, ...]:
    """Model, optimizer, loader and loss for one configuration (DP: a started round)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from client.privacy import start_dp_round
    from common.config import ModelConfig, PrivacyConfig, TaskConfig
    from common.models import build_model
    from common.training import make_loss

    kind, size, channels = CASES[name]
    task = TaskConfig(kind=kind, image_size=size)
    model = build_model(task, ModelConfig(name=name, channels=channels), seed=0).to(device)
    gen = torch.Generator().manual_seed(0)
    n = batch * batches
    x = torch.randn(n, 1, *size, generator=gen)
    y = (torch.randint(0, 2, (n,), generator=gen) if kind == "classification"
         else torch.randint(0, 2, (n, 1, *size), generator=gen))
    loader: Any = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, generator=gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dp_round = None
    if dp:
        dp_round = start_dp_round(
            model=model, optimizer=optimizer, loader=loader,
            privacy=PrivacyConfig(mode="dp_sgd", noise_multiplier=1.0, accountant="rdp"),
            planned_epochs=1, round_epochs=1, history=None, ceiling_epsilon=None, ledger=None,
            max_physical_batch=physical)
        model, optimizer, loader = dp_round.model, dp_round.optimizer, dp_round.loader
    return model, optimizer, loader, make_loss(task), dp_round


def measure(name: str, batch: int, dp: bool, device: str, steps: int, warmup: int,
            physical: int | None = None) -> dict[str, float]:
    """Time ``steps`` optimizer steps after ``warmup`` (run in a fresh process).

    With ``physical``, a DP step is the sum of its chunks' passes.
    """
    import torch

    model, optimizer, loader, criterion, dp_round = _setup(
        name, batch, dp, device, batches=steps + warmup + 2, physical=physical)
    dev = torch.device(device)
    cuda = dev.type == "cuda"

    def sync() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    phases: dict[str, list[float]] = {"forward": [], "backward": [], "step": []}
    current = {key: 0.0 for key in phases}
    samples: list[int] = []
    seen, done, base = 0, 0, 0.0
    model.train()
    for xb, yb in loader:
        if done == warmup and seen == 0:  # one-time costs stay out of the peak
            optimizer.zero_grad(set_to_none=True)  # no gradients held in the base
            gc.collect()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() / 2**20
            else:
                base = _reset_peak_rss()
        xb, yb = xb.to(dev), yb.to(dev)
        t0 = sync()
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(xb), yb)
        t1 = sync()
        loss.backward()
        t2 = sync()
        optimizer.step()
        t3 = sync()
        for key, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            current[key] += 1000 * seconds
        seen += xb.shape[0]
        if dp and optimizer._is_last_step_skipped:  # a chunk; the step comes later
            continue
        if done >= warmup:
            for key in phases:
                phases[key].append(current[key])
            samples.append(seen)
        current = {key: 0.0 for key in phases}
        seen, done = 0, done + 1
        if done == warmup + steps:
            break
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda else _status_mb("VmHWM")) - base
    if dp_round is not None:
        dp_round.finish()
    result = {key: sum(v) / len(v) for key, v in phases.items()}
    result["step_ms"] = sum(result.values())
    result.update(peak_mb=peak, base_mb=base, mean_batch=sum(samples) / len(samples))
    return result


def profile(name: str, batch: int, device: str) -> None:
    """Print the operators that take the most time in 5 DP-SGD steps (after 3 warm-up)."""
    import torch
    from torch.profiler import ProfilerActivity

    model, optimizer, loader, criterion, dp_round = _setup(name, batch, True, device,
                                                           batches=10)
    batches = iter(loader)

    def step() -> None:
        xb, yb = (t.to(device) for t in next(batches))
        optimizer.zero_grad(set_to_none=True)
        criterion(model(xb), yb).backward()
        optimizer.step()

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            step()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15))
    dp_round.finish()


def _run_one(args: argparse.Namespace, name: str, batch: int, dp: int) -> dict[str, float]:
    """One configuration in a fresh process: dp 0 = plain, 1 = DP, 2 = DP in chunks."""
    cmd = [sys.executable, __file__, "--device", args.device, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--physical", str(args.physical if dp == 2 else 0),
           "--one", name, str(batch), str(min(dp, 1))]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str]) -> int:
    """Measure every case in fresh subprocesses and print the table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--repeat", type=int, default=2,
                        help="fresh runs per configuration, plain and DP interleaved; the "
                             "fastest is kept (robust to other load on the machine)")
    parser.add_argument("--physical", type=int, default=0,
                        help="also run DP with Poisson batches cut into chunks of this many "
                             "samples (max_physical_batch; 0 = no such row)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch's default: one per core)")
    parser.add_argument("--profile", nargs=2, metavar=("MODEL", "BATCH"))
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "BATCH", "DP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.one:
        name, batch, dp = args.one
        print(json.dumps(measure(name, int(batch), dp == "1", args.device, args.steps,
                                 args.warmup, physical=args.physical or None)))
        return 0
    if args.profile:
        profile(args.profile[0], int(args.profile[1]), args.device)
        return 0
    print(f"device {args.device} (torch {torch.__version__}, {torch.get_num_threads()} threads); "
          f"{args.steps} timed steps after {args.warmup} warm-up, best of {args.repeat} fresh "
          "runs; DP = Opacus hooks mode, Poisson sampling at the same expected batch size; "
          "times in ms per step, peak = training memory above that held before step 1")
    head = (f"{'model':<5} {'batch':>5} {'mode':<5} {'samples':>7} {'step ms':>8} {'fwd':>7} "
            f"{'bwd':>7} {'opt':>7} {'peak MB':>8} {'time x':>7} {'mem x':>6}")
    print(head)
    print("-" * len(head))
    for name in CASES:
        for batch in BATCHES:
            modes = (0, 1, 2) if args.physical else (0, 1)
            runs: dict[int, list[dict[str, float]]] = {m: [] for m in modes}
            for _ in range(args.repeat):
                for mode in modes:
                    runs[mode].append(_run_one(args, name, batch, dp=mode))
            best = {m: min(runs[m], key=lambda r: r["step_ms"]) for m in modes}
            plain = best[0]
            for mode, label in ((0, "plain"), (1, "DP"), (2, f"DP/{args.physical}")):
                if mode not in best:
                    continue
                r = best[mode]
                time_x = r["step_ms"] / plain["step_ms"]
                mem_x = r["peak_mb"] / max(plain["peak_mb"], 1e-6)
                ratios = "" if mode == 0 else f" {time_x:>7.2f} {mem_x:>6.2f}"
                print(f"{name:<5} {batch:>5} {label:<5} {r['mean_batch']:>7.1f} "
                      f"{r['step_ms']:>8.1f} {r['forward']:>7.1f} {r['backward']:>7.1f} "
                      f"{r['step']:>7.1f} {r['peak_mb']:>8.1f}{ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
