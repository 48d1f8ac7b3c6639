"""The coordinating site: start the SuperLink, register the hospitals, run the experiment.

    python -m server --certs deploy/server experiment=pneumonia run_dir=runs/pneumonia
    python -m server --certs deploy/server --resume run_dir=runs/pneumonia
    python -m server --insecure ...          # no TLS, no node keys: a local test only

Options come first, then Hydra overrides of ``conf/`` (the same as
``simulate.py``). Round 1 starts once ``--wait-for`` hospitals (default
``federation.num_hospitals``) are connected, or after ``--wait-timeout``
seconds with those that are. ``--certs DIR`` is the ``server/`` folder written by
``python -m server.provision init``: the SuperLink runs with TLS and accepts
only hospitals whose key was registered; every key in ``DIR/hospitals/`` is
registered before the SuperLink opens its port. ``--host``/``--port`` say
where the hospitals connect (default 0.0.0.0:9092: open this TCP port to
the hospitals); that port serves only Flower's Fleet API (the Fleet gate,
``server/fleet_gate.py``), while the SuperLink's Control and Runtime APIs
listen on a loopback port that ``server.registry`` finds by itself.
``--resume`` continues the run folder's last completed round. The run shows
the same progress and writes the same run folder as ``simulate.py``; the
SuperLink and the gate are stopped on exit, errors, Ctrl-C and SIGTERM,
and by a watchdog (:mod:`common.watchdog`) when this process is killed
(SIGKILL included). The run folder and the site's SuperLink database are
locked while the server or any SuperLink it started runs: a second server
(``--resume`` included) on them is refused, naming the PID that holds them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.compose import CONF_DIR, compose_settings, finalize, settings_yaml
from common.config import ConfigError, Settings
from common.logs import medfed_logger
from common.processes import stop_children_on_signals
from common.watchdog import start_watchdog
from server.registry import (
    RegistrationError,
    load_records,
    preregister,
    wait_for_hospitals,
)
from server.runner import Connection, RunFailedError, submit_and_follow
from server.summary_table import print_summary
from server.superlink import CertificateError, Certificates, serving, site_locked

PROJECT_DIR = Path(__file__).resolve().parents[1]
log = medfed_logger()


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split MedFed's server options from the Hydra overrides."""
    groups = "\n".join(
        f"  {g.name}: {', '.join(sorted(p.stem for p in g.glob('*.yaml')))}"
        for g in sorted(CONF_DIR.iterdir()) if g.is_dir())
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__,
                                     epilog=f"Hydra config groups (GROUP=OPTION):\n{groups}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--certs", type=Path, help="server/ folder from server.provision")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS, no node authentication (a local test only)")
    parser.add_argument("--host", default="0.0.0.0",
                        help="address the hospitals connect to (Fleet API only)")
    parser.add_argument("--port", type=int, default=9092,
                        help="port the hospitals connect to (TCP)")
    parser.add_argument("--resume", action="store_true", help="continue the run in run_dir")
    parser.add_argument("--wait-for", type=int,
                        help="hospitals to wait for before round 1 (default: "
                             "federation.num_hospitals); 0 = start as soon as Flower may")
    parser.add_argument("--wait-timeout", type=float, default=300,
                        help="seconds to wait for them; then start with those connected")
    parser.add_argument("--app", type=Path, default=PROJECT_DIR,
                        help="Flower app folder to submit (default: this MedFed checkout)")
    parser.add_argument("--verbose", action="store_true", help="echo Flower's full log")
    return parser.parse_known_args(argv)


def _certificates(args: argparse.Namespace) -> Certificates | None:
    """The site's certificates (checked), or None for --insecure.

    Raises:
        CertificateError: neither or both of --certs / --insecure, or bad files.
    """
    if args.insecure == (args.certs is not None):
        raise CertificateError("pass --certs DIR (TLS + registered hospitals) or, for a "
                               "local test only, --insecure")
    if args.insecure:
        log.warning("[MedFed] WARNING: --insecure: traffic is not encrypted and any node can "
                    "join. Never use this with patient data.")
        return None
    certs = Certificates(args.certs.resolve())
    for warning in certs.check():
        log.warning("[MedFed] WARNING: %s", warning)
    return certs


def wait_for_round_1(settings: Settings, certs: Certificates | None, conn: Connection,
                     flwr_home: Path, args: argparse.Namespace) -> None:
    """Wait for ``--wait-for`` hospitals (up to ``--wait-timeout`` s), naming who is there."""
    wanted = settings.federation.num_hospitals if args.wait_for is None else args.wait_for
    if wanted <= 0:
        return
    names = {} if certs is None else {r["node-id"]: n for n, r in load_records(certs).items()}
    online = wait_for_hospitals(conn, flwr_home, count=wanted, timeout_s=args.wait_timeout,
                                names=names)
    if len(online) < wanted:
        log.warning("[MedFed] starting with %d of %d hospitals; a round needs %d "
                    "(federation.min_train)", len(online), wanted, settings.federation.min_train)


def serve(settings: Settings, certs: Certificates | None, args: argparse.Namespace) -> dict:
    """Register hospitals, start the SuperLink, run the experiment; returns its summary."""
    run_dir = Path(settings.run_dir)
    flwr_home = run_dir / "flwr-home"
    database = run_dir / "superlink.db" if certs is None else certs.database
    run_dir.mkdir(parents=True, exist_ok=True)
    with site_locked(run_dir, certs) as held:  # refused while another server holds them
        (run_dir / "config.yaml").write_text(settings_yaml(settings))
        if certs is not None:
            for line in preregister(certs, run_dir):
                log.info("[MedFed] hospital %s", line)
        with serving(host=args.host, port=args.port, certs=certs, database=database,
                     log_dir=run_dir, flwr_home=flwr_home, hold_fds=held) as conn:
            return _run(settings, certs, conn, flwr_home, args)


def _run(settings: Settings, certs: Certificates | None, conn: Connection, flwr_home: Path,
         args: argparse.Namespace) -> dict:
    """With the SuperLink up: wait for the hospitals, submit the run, follow it."""
    log.info("[MedFed] hospitals connect to %s:%d (%s; Flower's Fleet API only); the "
             "SuperLink's Control and Runtime APIs listen on %s, this machine only",
             args.host, args.port,
             "TLS, registered hospitals only" if certs else "INSECURE", conn.address)
    wait_for_round_1(settings, certs, conn, flwr_home, args)
    return submit_and_follow(settings, conn, project_dir=args.app.resolve(),
                             flwr_home=flwr_home, verbose=args.verbose)


def main(argv: list[str]) -> int:
    """Command line: options and Hydra overrides in, exit code out."""
    args, overrides = parse(argv)
    try:
        certs = _certificates(args)
        settings = finalize(compose_settings(overrides), base=Path.cwd())
    except (CertificateError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings.resume = settings.resume or args.resume
    stop_children_on_signals()
    start_watchdog()  # every process started below dies with this one, even on SIGKILL
    run_dir = Path(settings.run_dir)
    try:
        summary = serve(settings, certs, args)
    except (RunFailedError, RegistrationError, RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; the SuperLink was stopped. Continue with: python -m server "
              f"--resume run_dir={run_dir} ...", file=sys.stderr)
        return 130
    print_summary(summary, run_dir=run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
