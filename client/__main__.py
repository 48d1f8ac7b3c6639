"""A hospital's node: a Flower SuperNode that runs MedFed's ClientApp on local images.

    python -m client --kit /secure/medfed-site-a --data-path /data/site-a \\
        --ledger-path /secure/site-a-privacy.json --max-epsilon 8

``--kit`` is the startup folder the coordinating site provisioned (CA
certificate, ``hospital.toml`` with the server address, name and number)
holding the private key the hospital made itself (``python -m client keygen
--kit DIR``); any of those can be given or overridden with ``--superlink``,
``--name``, ``--partition-id``, ``--num-partitions``, ``--key``, ``--ca``.
Without a CA certificate the node refuses to start unless ``--insecure``
(no TLS, no key: a test on one machine only) is given.
The hospital's own settings (data, device, privacy ceiling, ledger) travel
in the node config: the server cannot change them. The node waits for the
server if it is not up yet and reconnects after a server restart (Flower's
own retry; ``--max-retries`` / ``--max-wait-time`` bound it). The node
answers only with app bundles this hospital approved (``python -m client
approve``; a hospital's runner, :mod:`client.runner`, refuses any other before
running any of it) and records every reply it sends in ``HOME/audit.jsonl``
(``python -m client audit``). Ctrl-C or SIGTERM stops the node, the runner
and every ClientApp process they started.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import deque
from pathlib import Path

from client.hospital import DEFAULT_DELTA, SplitPolicy
from client.node import (
    LEDGER_FILE,
    NODE_CONFIG_FILE,
    HospitalSettings,
    Kit,
    Link,
    NodeSetupError,
    StaleSessionWait,
    read_kit,
    refusal,
    supernode_argv,
    write_node_config,
)
from client.runner import runner_argv, write_secret
from client.session import end_previous_session, last_node_id
from common.logs import medfed_logger
from common.processes import ManagedProcess, free_port, running, stop_children_on_signals
from common.watchdog import start_watchdog

log = medfed_logger()
ANSI = re.compile(r"\x1b\[[0-9;]*m")
ECHO = ("SuperNode ID", "Connection successful", "Receiving:", "Sent successfully", "ERROR",
        "[MedFed]", "Exit Code", "[code:", "Ignoring message")


def parse(argv: list[str]) -> argparse.Namespace:
    """The hospital's command line."""
    commands = "\n".join(f"  python -m client {name:<8} {text}"
                         for name, (_, text) in SUBCOMMANDS.items())
    p = argparse.ArgumentParser(prog="python -m client", description=__doc__,
                                epilog=f"Other commands (each has --help):\n{commands}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kit", type=Path, help="this hospital's startup folder (from provisioning)")
    p.add_argument("--superlink", help="HOST:PORT of the coordinating site")
    p.add_argument("--name", help="this hospital's name")
    p.add_argument("--partition-id", type=int, help="this hospital's number, 0-based")
    p.add_argument("--num-partitions", type=int, help="hospitals in the federation")
    p.add_argument("--key", type=Path, help="this hospital's private key")
    p.add_argument("--ca", type=Path, help="the federation's CA certificate")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS, no key (only against a server started with --insecure)")
    p.add_argument("--data-path", type=Path, help="this hospital's data folder (its whole dataset)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="training device")
    p.add_argument("--max-epsilon", type=float, help="most DP epsilon ever spent on this data")
    p.add_argument("--delta", type=float,
                   help=f"delta this hospital accounts at (default {DEFAULT_DELTA:g})")
    p.add_argument("--ledger-path", type=Path, help="privacy ledger file on this hospital's "
                   f"disk (default: KIT/{LEDGER_FILE}, or HOME/{LEDGER_FILE} without a kit)")
    p.add_argument("--allowed-metrics", help="comma-separated metric names that may leave "
                   "(default: the ones MedFed sends)")
    split = SplitPolicy()
    p.add_argument("--split-seed", type=int, default=split.seed,
                   help="seed of this hospital's own train/val/test split of --data-path")
    p.add_argument("--val-fraction", type=float, default=split.val_fraction)
    p.add_argument("--test-fraction", type=float, default=split.test_fraction,
                   help="share of --data-path held out for evaluation (same images every run)")
    p.add_argument("--slice-block", type=int, default=split.slice_block,
                   help="segmentation: neighbouring slices kept on one side of the split")
    p.add_argument("--max-retries", type=int, help="give up after this many failed connections")
    p.add_argument("--max-wait-time", type=float, help="give up after this many seconds away")
    p.add_argument("--port", type=int, help="local ClientApp runtime port (default: a free one)")
    p.add_argument("--home", type=Path,
                   help="folder for the node's files and log (default: KIT/node or "
                        "./medfed-node-NAME)")
    p.add_argument("--verbose", action="store_true", help="echo Flower's whole log")
    return p.parse_args(argv)


def _pick(value: object, kit: Kit | None, field: str, flag: str) -> object:
    if value is not None:
        return value
    if kit is None:
        raise NodeSetupError(f"{flag} is required (or pass --kit DIR)")
    return getattr(kit, field)


def _link(args: argparse.Namespace, kit: Kit | None, superlink: str) -> Link:
    """The checked link: TLS with the CA and the hospital's own key, or an explicit --insecure.

    Raises:
        NodeSetupError: no CA certificate without --insecure; the kit's key not made yet;
            a file missing or wrong.
    """
    if args.insecure:
        return Link(superlink, None, None, args.max_retries, args.max_wait_time, insecure=True)
    if kit is not None and args.key is None and not kit.key.is_file():
        raise NodeSetupError(f"{kit.key} not found: this hospital has no key yet. Make it with "
                             f"`python -m client keygen --kit {kit.folder}` and send the "
                             f"{kit.name}.pub it writes to the coordinating site")
    link = Link(superlink, args.ca or (kit.ca if kit else None),
                args.key or (kit.key if kit else None), args.max_retries, args.max_wait_time)
    link.check()
    return link


def _split(args: argparse.Namespace) -> SplitPolicy:
    try:
        return SplitPolicy(seed=args.split_seed, val_fraction=args.val_fraction,
                           test_fraction=args.test_fraction, slice_block=args.slice_block)
    except ValueError as err:
        raise NodeSetupError(f"--{err}") from None


def setup(args: argparse.Namespace) -> tuple[HospitalSettings, Link, Path]:
    """Hospital settings, link and home folder from the command line (and kit).

    Raises:
        NodeSetupError: something is missing or wrong; the message says what.
    """
    kit = read_kit(args.kit) if args.kit else None
    for flag, path in (("--data-path", args.data_path),
                       ("--ledger-path's folder", args.ledger_path and args.ledger_path.parent)):
        if path is not None and not path.is_dir():
            raise NodeSetupError(f"{flag} {path} is not an existing folder")
    name = str(_pick(args.name, kit, "name", "--name"))
    home = (args.home or (kit.folder / "node" if kit else Path(f"medfed-node-{name}"))).resolve()
    # The ledger is the hospital's: never in a folder the server names
    ledger = args.ledger_path or (kit.folder if kit else home) / LEDGER_FILE
    metrics = args.allowed_metrics and tuple(m.strip() for m in args.allowed_metrics.split(",")
                                             if m.strip())
    settings = HospitalSettings(
        name=name,
        partition_id=int(str(_pick(args.partition_id, kit, "partition_id", "--partition-id"))),
        num_partitions=int(str(_pick(args.num_partitions, kit, "num_partitions",
                                     "--num-partitions"))),
        data_path=args.data_path and str(args.data_path.resolve()),
        device=args.device, max_epsilon=args.max_epsilon,
        delta=DEFAULT_DELTA if args.delta is None else args.delta,
        ledger_path=str(ledger.resolve()), allowed_metrics=metrics or None,
        split=_split(args))
    link = _link(args, kit, str(_pick(args.superlink, kit, "superlink", "--superlink")))
    return settings, link, home


def follow(node: ManagedProcess, name: str, verbose: bool, offset: int,
           runner: ManagedProcess | None = None) -> str:
    """Echo the node's notable log lines (after ``offset``) until it or ``runner`` exits
    (both write to the node's log); returns its tail."""
    away, pending, tail = False, b"", deque[str](maxlen=400)
    while True:
        code = node.poll() if runner is None or runner.poll() is None else runner.poll()
        with open(node.log_path, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
        offset += len(chunk)
        complete, _, pending = (pending + chunk).rpartition(b"\n")
        if code is not None:
            complete, pending = complete + b"\n" + pending, b""
        for raw in complete.decode(errors="replace").splitlines():
            line = ANSI.sub("", raw).strip()
            tail.append(line)
            if "Connection attempt failed" in line and not away:
                log.info("[MedFed] %s: server not reachable; Flower keeps retrying", name)
                away = True
            elif line and (verbose or any(mark in line for mark in ECHO)):
                # after Flower's exit line, retries are its helpers winding down
                away = "Exit Code" in line or (away and "Connection successful" not in line)
                log.info("[MedFed] %s: %s", name,
                         line.removeprefix("INFO :").strip().removeprefix("[MedFed] "))
        if code is not None:
            return "\n".join(tail)
        time.sleep(0.5)


SUBCOMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, what it does); each module has ``main(argv) -> int``
    "keygen": ("client.keys", "make this hospital's own key pair (hand over only the .pub)"),
    "apps": ("client.approval", "list the app bundles offered to this hospital and approved"),
    "approve": ("client.approval", "approve an app bundle by its hash"),
    "audit": ("client.audit", "print and verify this hospital's record of what left it"),
    "explain": ("client.explain", "Grad-CAM heatmaps of a model over this hospital's images"),
    "check": ("client.check", "check a data folder: every problem at once, counts per class"),
    "predict": ("client.predict", "apply an exported model to DICOM, NIfTI, PNG/JPEG files"),
}
"""``python -m client NAME ...``: commands beside running the node."""


def run_subcommand(name: str, argv: list[str]) -> int:
    """Run ``python -m client NAME ARGV`` through its module's ``main``."""
    import importlib

    module = importlib.import_module(SUBCOMMANDS[name][0])
    code: int = module.main([name, *argv]) if name in ("apps", "approve") else module.main(argv)
    return code


def main(argv: list[str]) -> int:
    """Check the hospital's files, then run its node until Ctrl-C; the exit code."""
    if argv and argv[0] in SUBCOMMANDS:
        return run_subcommand(argv[0], argv[1:])
    args = parse(argv)
    try:
        settings, link, home = setup(args)
    except NodeSetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if settings.data_path is not None and refuse_data(Path(settings.data_path), settings):
        return 2
    stop_children_on_signals()
    start_watchdog()  # the node, the runner and its tasks die with this process, even on SIGKILL
    config = write_node_config(settings.node_config(), home / NODE_CONFIG_FILE)
    port, secret = args.port or free_port(), write_secret(home)
    log.info("[MedFed] %s: node for %s starting (%s); log: %s", settings.name, link.superlink,
             "INSECURE" if link.ca is None else "TLS, registered key", home / "node.log")
    log.info("[MedFed] %s: %s", settings.name, settings.policy())
    try:
        output, code, runner_stopped = run_node(settings, link, config, home, port, secret,
                                                args.verbose)
    except KeyboardInterrupt:
        log.info("[MedFed] %s: stopped; the node and its ClientApps were shut down",
                 settings.name)
        return 130
    reason = refusal(output, settings.name) or "see the log"
    if runner_stopped:
        reason = f"the hospital's runner stopped ({reason})"
    print(f"error: the node stopped (exit code {code}): {reason}; log: {home / 'node.log'}",
          file=sys.stderr)
    return code


def refuse_data(folder: Path, settings: HospitalSettings) -> bool:
    """Check the hospital's folder before the node starts; True (and the list) on errors."""
    from client.check import folder_settings
    from common.data.check import check_folder

    split = settings.split
    experiment, _ = folder_settings(folder, [f"seed={split.seed}",
                                             f"data.val_fraction={split.val_fraction}",
                                             f"data.test_fraction={split.test_fraction}",
                                             f"data.slice_block={split.slice_block}"])
    report = check_folder(folder, experiment, hospital=settings.partition_id,
                          known_classes=False)
    for line in report.lines():
        log.info("[MedFed] %s: %s", settings.name, line)
    if report.errors:
        print(f"error: {folder} has {len(report.errors)} data problem(s); the node was not "
              "started:\n" + "\n".join(f"  [{p.kind}] {p.message}" for p in report.errors),
              file=sys.stderr)
    return bool(report.errors)


def attempt(settings: HospitalSettings, link: Link, config: Path, home: Path, port: int,
            secret: Path, verbose: bool) -> tuple[str, int, bool]:
    """Run the SuperNode and the runner once, until one stops.

    Returns:
        The tail of the node's log, the exit code, and whether the runner
        stopped first.
    """
    env = {"FLWR_HOME": str(home / "flwr-home")}
    node = ManagedProcess(f"hospital {settings.name}",
                          supernode_argv(link, config, port=port, secret_file=secret),
                          home / "node.log", env=env)
    runner = ManagedProcess(f"runner {settings.name}",  # answers with approved code only
                            runner_argv(f"127.0.0.1:{port}", home, secret), node.log_path,
                            env=env)
    offset = node.log_path.stat().st_size if node.log_path.exists() else 0
    with running(node, runner):
        output = follow(node, settings.name, verbose, offset, runner)
        runner_stopped = node.poll() is None  # the runner ended first
    code = (runner.poll() if runner_stopped else node.poll()) or 1
    return output, code, runner_stopped


def run_node(settings: HospitalSettings, link: Link, config: Path, home: Path, port: int,
             secret: Path, verbose: bool) -> tuple[str, int, bool]:
    """Run the node until it stops for good; as :func:`attempt`.

    A node refused right after a restart while the coordinating site may
    still hold its previous session is started again (:class:`StaleSessionWait`).
    """
    wait, first_refusal = StaleSessionWait(), None
    while True:
        log_path = home / "node.log"
        earlier = log_path.read_text(errors="replace") if log_path.exists() else ""
        output, code, runner_stopped = attempt(settings, link, config, home, port, secret,
                                               verbose)
        if runner_stopped or not wait.applies(output, earlier):
            return output, code, runner_stopped
        if first_refusal is None:
            first_refusal = time.monotonic()
            if release(settings.name, link, earlier):
                continue
        waited = time.monotonic() - first_refusal
        if waited >= wait.limit_s:
            return output, code, runner_stopped
        log.info("[MedFed] %s", wait.message(settings.name, waited))
        time.sleep(wait.retry_s)


def release(name: str, link: Link, earlier_log: str) -> bool:
    """Ask the server to end this hospital's previous session (see :mod:`client.session`)."""
    node_id = last_node_id(earlier_log)
    if node_id is None:
        return False
    failure = end_previous_session(link, node_id)
    if failure is None:
        log.info("[MedFed] %s: the coordinating site still held this hospital's previous "
                 "session (node %d); it was ended, connecting again", name, node_id)
        return True
    log.info("[MedFed] %s: could not end the previous session (node %d): %s", name, node_id,
             failure)
    return False

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
