"""The coordinating site: start the SuperLink, register hospitals, run the experiment.

    python -m server --certs deploy/server experiment=pneumonia federation.rounds=5
    python -m server --certs deploy/server --resume run_dir=runs/pneumonia-site
    python -m server --insecure ...          # no TLS, no authentication (testing only)

Options before the Hydra overrides: ``--certs DIR`` (the ``server/`` folder
written by ``python -m server.provision``), ``--host``/``--port`` where the
SuperLink listens (default 0.0.0.0:9092: open this TCP port to the hospitals),
``--resume`` (continue the run folder's last completed round), ``--insecure``.
Hospitals are registered from ``DIR/hospitals/*.pub`` at every start. The
run shows the same progress and writes the same run folder as
``simulate.py``; the SuperLink is stopped on exit, errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.compose import compose_settings, finalize, settings_yaml
from common.config import ConfigError
from common.logs import medfed_logger
from common.processes import running, stop_children_on_signals, wait_for_port
from server.runner import RunFailedError, submit_and_follow
from server.summary_table import print_summary
from server.superlink import Certificates, connection, register_hospital, superlink_process

PROJECT_DIR = Path(__file__).resolve().parents[1]
log = medfed_logger()


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split MedFed's server options from the Hydra overrides."""
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--certs", type=Path, help="server/ folder from server.provision")
    parser.add_argument("--insecure", action="store_true", help="no TLS, no node authentication")
    parser.add_argument("--host", default="0.0.0.0", help="address the SuperLink listens on")
    parser.add_argument("--port", type=int, default=9092, help="SuperLink port (TCP)")
    parser.add_argument("--resume", action="store_true", help="continue the run in run_dir")
    parser.add_argument("--verbose", action="store_true", help="echo Flower's full log")
    return parser.parse_known_args(argv)


def main(argv: list[str]) -> int:
    """Command line: options and Hydra overrides in, exit code out."""
    args, overrides = parse(argv)
    stop_children_on_signals()
    if args.insecure == (args.certs is not None):
        print("error: pass --certs DIR (TLS + registered hospitals) or, for tests only, "
              "--insecure", file=sys.stderr)
        return 2
    try:
        settings = finalize(compose_settings(overrides), base=Path.cwd())
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    settings.resume = settings.resume or args.resume
    certs = None if args.insecure else Certificates(args.certs.resolve())
    if certs is None:
        log.warning("[MedFed] WARNING: --insecure: traffic is not encrypted and any node can "
                    "join. Never use this with patient data.")
    else:
        try:
            certs.check()
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(settings_yaml(settings))
    flwr_home = run_dir / "flwr-home"
    local = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    conn = connection(address=f"{local}:{args.port}", certs=certs)
    try:
        with running(superlink_process(host=args.host, port=args.port, certs=certs,
                                       log_dir=run_dir, flwr_home=flwr_home)) as (link,):
            wait_for_port(local, args.port, timeout_s=60, proc=link)
            for key in [] if certs is None else certs.hospital_keys():
                log.info("[MedFed] hospital %s: %s", key.stem,
                         register_hospital(key, conn, flwr_home))
            log.info("[MedFed] SuperLink on %s:%d; waiting for %d hospitals", args.host,
                     args.port, settings.federation.min_train)
            summary = submit_and_follow(settings, conn, project_dir=PROJECT_DIR,
                                        flwr_home=flwr_home, verbose=args.verbose)
    except (RunFailedError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the SuperLink was stopped. Resume with --resume", file=sys.stderr)
        return 130
    print_summary(summary, run_dir=run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
