"""DP-SGD step cost vs a plain step, every mode side by side in one run.

    .venv/bin/python bench/dp_step_cost.py                 # CPU, 1 thread
    .venv/bin/python bench/dp_step_cost.py --threads 2     # both sides on 2 threads
    .venv/bin/python bench/dp_step_cost.py --device cuda   # a GPU

For the default classifier (cnn, 28x28) and the default U-Net (unet, 64x64)
at batch 16 and 32, each configuration runs in its own fresh subprocess so
peak memories do not mix: plain training, then DP-SGD in every Opacus
``privacy.grad_sample_mode`` (hooks, functorch, ghost, ew, and what ``auto``
resolves to), for the default network and for its variants with fast Opacus
paths (``model.act=relu``; for the U-Net with ``model.upsample=resize``);
what ``auto`` resolves to is printed per network. Each DP mode also runs
with ``privacy.max_physical_batch`` (``--physical``: 8 and half the batch by
default; rows ``MODE/pN``): Poisson batches processed in chunks of at most N
samples, one noised step per logical batch, which bounds DP's memory.
Every process uses the same ``torch.set_num_threads`` (``--threads``, 1 by
default: on a shared machine more threads than free cores make timings
spin-wait noise, for plain and DP alike).

Reported: the best step time (forward, backward, optimizer step; after 2
warm-up steps: on a shared machine the least-disturbed step is the fairest
estimate of each configuration's own cost; for DP, whose Poisson batches
vary around the nominal size, the best among steps of nearly the nominal
size, so that a lucky small batch does not flatter DP) and two peak
memories of training:
``MB`` (CPU: peak RSS growth of the process after model and data are built,
which includes what the allocator keeps; CUDA: peak allocated) and
``tensor MB`` (the peak bytes of the tensors a step creates: activations,
gradients, per-sample gradients, noise; counted exactly over 2 more steps
with a dispatch mode that sees every tensor PyTorch creates and when its
storage is freed, scaled to the nominal batch size by images per step;
weights, optimizer state and the batch are not counted, as they exist
before the step). Then ``time x`` / ``mem x`` / ``tensor x``: DP
over plain training of the same network, and ``vs default``: DP over plain
training of the default network (what a user pays for DP plus the model
change).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]
MEMORY_STEPS = 2  # logical steps after the timed ones whose tensors are counted (CPU)
# name, task kind, image size, channels (the configured defaults), variants, modes
# (PyTorch's expanded weights cannot run MONAI's UNet: a non-contiguous view)
CASES = (("cnn", "classification", [28, 28], [16, 32, 64],
          ("default", "act=relu"), ("output_hooks", "hooks", "functorch", "ghost", "ew")),
         ("unet", "segmentation", [64, 64], [16, 32, 64, 128],
          ("default", "act=relu,upsample=resize"), ("output_hooks", "hooks", "functorch", "ghost")))


class TensorPeak(TorchDispatchMode):
    """Peak bytes of the CPU or GPU tensor storages created while active (a dispatch mode).

    Every tensor an ATen operation returns whose storage was not seen before
    is counted at its storage's size until that storage is freed (a
    finalizer on PyTorch's preserved storage object); storages that existed
    before (weights, the batch) are seen as inputs and never counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def _see(self, tensor: torch.Tensor, created: bool) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._sizes:
            return
        self._sizes[key] = storage.nbytes() if created else 0
        self.live += self._sizes[key]
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                self._see(leaf, created=False)
        out = func(*args, **kwargs)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._see(leaf, created=True)
        return out


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _model_options(variant: str) -> dict[str, str]:
    if variant == "default":
        return {}
    return dict(item.split("=") for item in variant.split(","))


def measure(name: str, variant: str, batch: int, mode: str, device: str,
            steps: int) -> dict[str, float | str]:
    """Time ``steps`` training steps of one configuration (run in a fresh process).

    ``mode`` is ``plain``, an Opacus ``grad_sample_mode``, or ``MODE/pN``: that
    mode with ``privacy.max_physical_batch=N`` (Opacus' BatchMemoryManager, as
    client/dp_round.py runs it), where a step is one logical (Poisson) batch:
    every chunk's forward and backward plus the one noised optimizer step.
    """
    import contextlib

    sys.path.insert(0, str(ROOT))
    from client.dp_sgd import PerSampleLoss, make_private, poisson_loader
    from common.config import ModelConfig, PrivacyConfig, TaskConfig
    from common.models import build_model
    from common.training import make_loss

    _, kind, size, channels, _, _ = next(c for c in CASES if c[0] == name)
    task = TaskConfig(kind=kind, image_size=size)
    dev = torch.device(device)
    model = build_model(task, ModelConfig(name=name, channels=channels,
                                          **_model_options(variant)), seed=0).to(dev)
    n = batch * (steps + 3 + MEMORY_STEPS)
    x = torch.randn(n, 1, *size)
    y = (torch.randint(0, 2, (n,)) if kind == "classification"
         else torch.randint(0, 2, (n, 1, *size)))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion = make_loss(task)
    mode, _, chunk = mode.partition("/p")
    physical = int(chunk or 0)
    resolved = mode
    chunks = contextlib.ExitStack()
    if mode != "plain":
        privacy = PrivacyConfig(mode="dp_sgd", noise_multiplier=1.0, grad_sample_mode=mode)
        dp_round = make_private(model=model, optimizer=optimizer, loader=poisson_loader(loader),
                                noise_multiplier=1.0, max_grad_norm=privacy.max_grad_norm,
                                accountant=privacy.accountant, grad_sample_mode=mode,
                                criterion=PerSampleLoss(task))
        optimizer, loader, resolved = dp_round.optimizer, dp_round.loader, dp_round.mode
        model = dp_round.model
        criterion = dp_round.criterion or criterion
        if physical:
            from opacus.utils.batch_memory_manager import BatchMemoryManager
            loader = chunks.enter_context(BatchMemoryManager(
                data_loader=loader, optimizer=optimizer, max_physical_batch_size=physical))
            resolved = f"{resolved}/p{physical}"
    base_mb = _peak_rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mb = torch.cuda.memory_allocated() / 2**20
    # per logical step: seconds and images (Poisson batches vary around ``batch``)
    timed: list[tuple[float, int]] = []
    tensor_peaks: list[float] = []  # counted steps: peak tensor bytes, scaled to ``batch``
    logical, spent, images = 0, 0.0, 0
    counter, peak = TensorPeak(), 0.0
    with chunks:
        for xb, yb in loader:
            if logical == steps + 2 and not peak:  # timing done: count the next steps' tensors
                peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
                        else _peak_rss_mb())
                chunks.enter_context(counter)
            if logical >= steps + 2 and images == 0:
                counter.peak = start = counter.live
            if xb.shape[0] == 0:
                continue
            xb, yb = xb.to(dev), yb.to(dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            criterion(model(xb), yb).backward()
            optimizer.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            spent += time.perf_counter() - started
            images += xb.shape[0]
            if getattr(optimizer, "_is_last_step_skipped", False):
                continue  # a chunk of a logical batch: its step comes with the last chunk
            if 2 <= logical < steps + 2:  # warm-up steps excluded
                timed.append((spent, images))
            elif logical >= steps + 2:
                tensor_peaks.append((counter.peak - start) * batch / images)
            logical, spent, images = logical + 1, 0.0, 0
            if logical == steps + 2 + MEMORY_STEPS:
                break
    return {"step_ms": 1000 * _fair_best(timed, batch), "peak_mb": peak - base_mb,
            "tensor_mb": max(tensor_peaks, default=0.0) / 2**20, "resolved": resolved}


def _fair_best(timed: list[tuple[float, int]], batch: int) -> float:
    """The best step time among steps of (nearly) ``batch`` images.

    A Poisson batch holds ``batch`` images only on average; the fastest of
    many steps would otherwise be one of the smallest batches, flattering DP
    against plain training's fixed batches. Steps within ``max(1, batch //
    16)`` images of ``batch`` count; without one, the best time per image,
    times ``batch``.
    """
    near = [seconds for seconds, images in timed if abs(images - batch) <= max(1, batch // 16)]
    return min(near) if near else min(seconds * batch / images for seconds, images in timed)

def _run_one(args: argparse.Namespace, name: str, variant: str, batch: int,
             mode: str) -> dict[str, float | str] | None:
    cmd = [sys.executable, __file__, "--device", args.device, "--steps", str(args.steps),
           "--threads", str(args.threads), "--one", name, variant, str(batch), mode]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"  ({name} {variant} b{batch} {mode}: failed: "
              f"{(out.stderr.strip().splitlines() or ['?'])[-1][:110]})")
        return None
    result: dict[str, float | str] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str]) -> int:
    """Run every case in subprocesses and print the table of ratios."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="*", default=[c[0] for c in CASES])
    parser.add_argument("--batches", nargs="*", type=int, default=[16, 32])
    parser.add_argument("--modes", nargs="*", default=None,
                        help="DP modes (default: all that run on the model)")
    parser.add_argument("--variants", nargs="*", default=None,
                        help="model variants (default: all of each model's)")
    parser.add_argument("--physical", nargs="*", default=["8", "half"],
                        help="also run each DP mode with privacy.max_physical_batch=N for "
                             "each N given ('half' = half the batch; rows MODE/pN; "
                             "none given = off)")
    parser.add_argument("--one", nargs=4, metavar=("MODEL", "VARIANT", "BATCH", "MODE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        name, variant, batch, mode = args.one
        print(json.dumps(measure(name, variant, int(batch), mode, args.device, args.steps)))
        return 0
    print(f"device {args.device}, {args.threads} thread(s) per process, best of {args.steps} "
          "steps after 2 warm-up steps, Poisson sampling, each row a fresh process")
    print(f"{'model':<5} {'variant':<24} {'batch':>5} {'mode':<17} {'ms':>7} {'MB':>7} "
          f"{'tensor MB':>9} {'time x':>6} {'mem x':>6} {'tensor x':>8} "
          f"{'vs default: time x':>18} {'mem x':>6}")
    for name, kind, size, channels, variants, modes in CASES:
        if name not in args.models:
            continue
        for variant in args.variants or variants:
            print(f"{name:<5} {variant:<24} privacy.grad_sample_mode=auto runs "
                  f"{_auto_mode(name, kind, size, channels, variant)}")
        for batch in args.batches:
            default_plain = None
            for variant in args.variants or variants:
                if variant not in variants:
                    continue
                plain = _run_one(args, name, variant, batch, "plain")
                if plain is None:
                    continue
                default_plain = default_plain or plain
                _row(name, variant, batch, "plain", plain, plain, default_plain)
                sizes = sorted({batch // 2 if p == "half" else int(p) for p in args.physical})
                chunked = [f"{m}/p{k}" for k in sizes if 0 < k < batch
                           for m in args.modes or modes]
                for mode in [*(args.modes or modes), *chunked]:
                    res = _run_one(args, name, variant, batch, mode)
                    if res is not None:
                        _row(name, variant, batch, mode, res, plain, default_plain)
    return 0


def _auto_mode(name: str, kind: str, size: list[int], channels: list[int], variant: str) -> str:
    """What ``grad_sample_mode=auto`` resolves to for this network."""
    sys.path.insert(0, str(ROOT))
    from client.dp_sgd import resolve_grad_sample_mode
    from common.config import ModelConfig, TaskConfig
    from common.models import build_model

    net = build_model(TaskConfig(kind=kind, image_size=size),
                      ModelConfig(name=name, channels=channels, **_model_options(variant)))
    return resolve_grad_sample_mode("auto", net)


def _row(name: str, variant: str, batch: int, mode: str, res: dict[str, float | str],
         plain: dict[str, float | str], default: dict[str, float | str]) -> None:
    ms, mb, tensor_mb = float(res["step_ms"]), float(res["peak_mb"]), float(res["tensor_mb"])

    def ratio(value: float, ref: dict[str, float | str], key: str) -> float:
        return value / max(float(ref[key]), 1e-6)
    print(f"{name:<5} {variant:<24} {batch:>5} {mode:<17} {ms:>7.1f} {mb:>7.1f} "
          f"{tensor_mb:>9.1f} "
          f"{ratio(ms, plain, 'step_ms'):>6.2f} {ratio(mb, plain, 'peak_mb'):>6.2f} "
          f"{ratio(tensor_mb, plain, 'tensor_mb'):>8.2f} "
          f"{ratio(ms, default, 'step_ms'):>18.2f} {ratio(mb, default, 'peak_mb'):>6.2f}",
          flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
