"""A hospital's node: a Flower SuperNode that runs MedFed's ClientApp on local images.

    python -m client --superlink coordinator.example.org:9092 --name site-a \\
        --partition-id 0 --num-partitions 3 --key kit/site-a.key --ca kit/ca.crt \\
        --data-path /data/site-a --ledger-path /secure/site-a-ledger.json --max-epsilon 8

The hospital's own settings (its data folder, device, privacy ceiling,
ledger) travel in the SuperNode's node config: the server cannot change
them. The node keeps retrying while the server is unreachable (not up yet,
or restarting) and stops itself and every ClientApp it started on exit or
Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import wire
from common.logs import medfed_logger
from common.processes import ManagedProcess, free_port, stop_children_on_signals

log = medfed_logger()


def parse(argv: list[str]) -> argparse.Namespace:
    """The hospital's command line."""
    p = argparse.ArgumentParser(prog="python -m client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--superlink", required=True, help="HOST:PORT of the coordinating site")
    p.add_argument("--name", required=True, help="this hospital's name")
    p.add_argument("--partition-id", type=int, default=0, help="this hospital's index")
    p.add_argument("--num-partitions", type=int, default=1, help="hospitals in the federation")
    p.add_argument("--key", type=Path, help="this hospital's private key (from provisioning)")
    p.add_argument("--ca", type=Path, help="the federation's CA certificate")
    p.add_argument("--insecure", action="store_true", help="no TLS (testing only)")
    p.add_argument("--data-path", help="this hospital's data folder (its whole dataset)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="training device")
    p.add_argument("--max-epsilon", type=float, help="most DP epsilon ever spent on this data")
    p.add_argument("--delta", type=float, help="delta of that ceiling")
    p.add_argument("--ledger-path", type=Path, help="privacy ledger file on this hospital's disk")
    p.add_argument("--port", type=int, help="local ClientApp runtime port (default: a free one)")
    p.add_argument("--log", type=Path, help="log file (default: <name>-node.log)")
    p.add_argument("--max-restarts", type=int, help="give up after this many node exits")
    return p.parse_args(argv)


def node_config(args: argparse.Namespace) -> str:
    """The SuperNode's ``--node-config`` string (TOML values)."""
    values: dict[str, object] = {wire.PARTITION_ID: args.partition_id,
                                 wire.NUM_PARTITIONS: args.num_partitions,
                                 wire.HOSPITAL_NAME: args.name}
    optional = {wire.DATA_PATH: args.data_path and str(Path(args.data_path).resolve()),
                wire.DEVICE: args.device, wire.MAX_EPSILON: args.max_epsilon,
                wire.MAX_DELTA: args.delta,
                wire.LEDGER_PATH: args.ledger_path and str(args.ledger_path.resolve())}
    values.update({k: v for k, v in optional.items() if v is not None})
    return " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in values.items())


def supernode_argv(args: argparse.Namespace) -> list[str]:
    """``flower-supernode`` command line for this hospital."""
    binary = str(Path(sys.executable).with_name("flower-supernode"))
    argv = [binary, "--superlink", args.superlink, "--node-config", node_config(args),
            "--port", str(args.port or free_port())]  # no --max-retries: retry for ever
    if args.insecure:
        return [*argv, "--insecure"]
    return [*argv, "--root-certificates", str(args.ca.resolve()),
            "--auth-supernode-private-key", str(args.key.resolve())]


def run_node(args: argparse.Namespace, log_path: Path) -> int:
    """Run the SuperNode, restarting it after it exits, until Ctrl-C or too many restarts.

    A SuperNode retries by itself while the server is unreachable; it exits
    when the server refuses it (for instance while a restarted server has
    not yet re-registered this hospital's key), so it is started again after
    a growing pause (5 s up to 60 s).
    """
    restarts, pause = 0, 5.0
    while True:
        node = ManagedProcess(f"hospital {args.name}", supernode_argv(args), log_path)
        try:
            node.start()
            code = node.wait()
        except KeyboardInterrupt:
            return 130
        finally:
            node.stop()
        restarts += 1
        reason = " | ".join(line.strip() for line in node.tail(40).splitlines()
                            if "code:" in line or "Error" in line)[-300:]
        if args.max_restarts is not None and restarts > args.max_restarts:
            print(f"error: the node exited with code {code} ({reason}); see {log_path}",
                  file=sys.stderr)
            return code or 1
        log.warning("[MedFed] %s: node exited with code %d (%s); restarting in %.0f s",
                    args.name, code, reason or "see the log", pause)
        try:
            time.sleep(pause)
        except KeyboardInterrupt:
            return 130
        pause = min(pause * 2, 60.0)


def main(argv: list[str]) -> int:
    """Check the hospital's files, then run its node; the exit code."""
    args = parse(argv)
    if not args.insecure:
        for flag, path in (("--key", args.key), ("--ca", args.ca)):
            if path is None or not path.is_file():
                print(f"error: {flag} {path} not found (or pass --insecure for tests)",
                      file=sys.stderr)
                return 2
    if args.data_path and not Path(args.data_path).is_dir():
        print(f"error: --data-path {args.data_path} is not a folder", file=sys.stderr)
        return 2
    stop_children_on_signals()
    log_path = args.log or Path(f"{args.name}-node.log")
    log.info("[MedFed] %s: node for %s starting; log: %s", args.name, args.superlink, log_path)
    return run_node(args, log_path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
