"""How a simulation's time per round and memory grow with the number of hospitals.

    .venv/bin/python bench/scale_hospitals.py                       # 10, 30, 100 hospitals
    .venv/bin/python bench/scale_hospitals.py --hospitals 10 100 --rounds 3 -- tracking=none

Runs ``python simulate.py federation.num_hospitals=N`` (synthetic data, small
CNN: the defaults) once per N, each as a fresh process, and samples the
memory of its whole process tree every ``--interval`` seconds (SuperLink,
SuperExec, ServerApp, simulation, Ray's GCS, raylet and workers: every
descendant, also one that was re-parented after its parent exited). Prints
one table:

- ``s/round``: steady seconds per round (rounds 2.. from ``metrics.jsonl``),
  ``round 1 s`` separately (it pays the actors' first imports);
- ``wall s``: the whole command, start to exit;
- ``peak PSS GB``: the largest sum over the tree of each process's
  proportional set size (shared pages, e.g. torch's libraries mapped by
  every Ray worker, divided among the processes that map them: the memory
  the tree really needs); ``peak RSS GB`` beside it counts a shared page
  once per process, so it overstates;
- ``CPU s/round``: CPU seconds (user + system) the whole tree spent per
  steady round, read at each round's end as it is written to
  ``metrics.jsonl``; unlike wall time it hardly moves when other work
  shares the cores;
- ``ms/round/hosp``, ``CPU ms/hosp`` and ``MB/hosp``: per hospital, and the
  growth ratios of CPU time and memory per hospital between consecutive
  rows (x1.00 = linear; above 1 = superlinear).

Anything after ``--`` is passed to every run (Hydra overrides).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
GB = 1024 ** 3
MB = 1024 ** 2
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
         "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}


@dataclass
class TreeSampler:
    """Samples the summed RSS and PSS of a process and all its descendants.

    Processes seen once stay followed (by PID and start time) after they are
    re-parented, so a daemonised Ray process still counts.

    Attributes:
        root: PID of the tree's root.
        interval_s: seconds between samples.
    """

    root: int
    interval_s: float = 0.5
    metrics: Path | None = None
    round_cpu: list[float] = field(default_factory=list)
    """Tree CPU seconds when each round's row appeared in ``metrics``."""
    peak_rss: int = 0
    peak_pss: int = 0
    peak_procs: int = 0
    _known: dict[int, psutil.Process] = field(default_factory=dict)
    _cpu: dict[int, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.root)
            for proc in [root, *root.children(recursive=True)]:
                self._known.setdefault(proc.pid, proc)
        rss = pss = alive = 0
        for pid, proc in list(self._known.items()):
            try:
                if not proc.is_running():  # gone, or the PID was reused
                    del self._known[pid]
                    continue
                info = proc.memory_full_info()
                times = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                del self._known[pid]
                continue
            except psutil.AccessDenied:
                continue
            rss, pss, alive = rss + info.rss, pss + info.pss, alive + 1
            self._cpu[pid] = times.user + times.system  # kept after the process exits
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, alive)
        if self.metrics is not None and self.metrics.exists():
            text = self.metrics.read_text()
            done = text.count('"phase": "round"')
            while len(self.round_cpu) < done:
                self.round_cpu.append(sum(self._cpu.values()))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def start(self) -> TreeSampler:
        """Start sampling in a background thread."""
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@dataclass(frozen=True)
class Row:
    """Figures of one run with ``hospitals`` hospitals (seconds, bytes)."""

    hospitals: int
    rounds: int
    steady_s: float
    first_s: float
    wall_s: float
    peak_pss: int
    peak_rss: int
    procs: int
    cpu_s: float


def round_ends(run_dir: Path) -> list[float]:
    """Seconds since the ServerApp started at which each round ended (``metrics.jsonl``)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["elapsed_s"] for r in rows if r.get("phase") == "round"]


def measure(hospitals: int, rounds: int, overrides: list[str], workdir: Path,
            interval_s: float) -> Row:
    """One fresh ``simulate.py`` run with ``hospitals`` hospitals, sampled to its exit."""
    run_dir = workdir / f"n{hospitals}"
    argv = [sys.executable, "simulate.py", f"federation.num_hospitals={hospitals}",
            f"federation.rounds={rounds}", f"run_dir={run_dir}", *overrides]
    log_path = workdir / f"n{hospitals}.log"
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **QUIET})
        sampler = TreeSampler(proc.pid, interval_s, metrics=run_dir / "metrics.jsonl").start()
        try:
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()  # simulate.py stops every process it started, by PID
                proc.wait()
            sampler.stop()
    wall = time.perf_counter() - started
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"simulate.py with {hospitals} hospitals exited {code}:\n{tail}")
    ends = round_ends(run_dir)
    laps = [b - a for a, b in itertools.pairwise(ends)]
    steady = sum(laps) / len(laps) if laps else float("nan")
    cpu = sampler.round_cpu
    cpu_s = (cpu[-1] - cpu[0]) / (len(cpu) - 1) if len(cpu) > 1 else float("nan")
    return Row(hospitals, len(ends), steady, ends[0] if ends else float("nan"), wall,
               sampler.peak_pss, sampler.peak_rss, sampler.peak_procs, cpu_s)


def table(rows: list[Row]) -> str:
    """The printed table, growth ratios against the previous row."""
    head = (f"{'N':>4} {'rounds':>6} {'s/round':>8} {'round 1 s':>9} {'wall s':>7} "
            f"{'CPU s/round':>11} {'peak PSS GB':>11} {'peak RSS GB':>11} {'procs':>5} "
            f"{'ms/round/hosp':>13} {'CPU ms/hosp':>11} {'MB/hosp':>8} {'x CPU/hosp':>10} "
            f"{'x MB/hosp':>9}")
    lines = [head, "-" * len(head)]
    previous: Row | None = None
    for r in rows:
        per_time = 1000 * r.steady_s / r.hospitals
        per_cpu = 1000 * r.cpu_s / r.hospitals
        per_mem = r.peak_pss / MB / r.hospitals
        grow_t = grow_m = "-"
        if previous is not None:
            grow_t = f"x{per_cpu / (1000 * previous.cpu_s / previous.hospitals):.2f}"
            grow_m = f"x{per_mem / (previous.peak_pss / MB / previous.hospitals):.2f}"
        lines.append(f"{r.hospitals:>4} {r.rounds:>6} {r.steady_s:>8.2f} {r.first_s:>9.2f} "
                     f"{r.wall_s:>7.1f} {r.cpu_s:>11.2f} {r.peak_pss / GB:>11.2f} "
                     f"{r.peak_rss / GB:>11.2f} {r.procs:>5} {per_time:>13.1f} {per_cpu:>11.1f} "
                     f"{per_mem:>8.1f} {grow_t:>10} {grow_m:>9}")
        previous = r
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Command line; prints the table."""
    ours, overrides = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    parser = argparse.ArgumentParser(prog="bench/scale_hospitals.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hospitals", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (>= 2)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args(ours)
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (round 1 is reported apart from the steady rounds)")
    with tempfile.TemporaryDirectory(prefix="medfed-scale-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = []
        for n in args.hospitals:
            rows.append(measure(n, args.rounds, overrides, workdir, args.interval))
            print(f"# {n} hospitals done in {rows[-1].wall_s:.0f} s:\n"
                  + table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        print(f"simulate.py federation.rounds={args.rounds} {' '.join(overrides)}".rstrip()
              + f" on {os.cpu_count()} cores; memory sampled every {args.interval} s")
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
