"""Which app bundles this hospital runs: offered, kept for review, approved by hash.

    python -m client apps --kit DIR                  # offered and approved bundles
    python -m client apps --kit DIR --show HASH      # a bundle's files and their SHA-256
    python -m client apps --kit DIR --diff HASH      # what changed against the approved one
    python -m client approve HASH --kit DIR          # run this bundle from now on
    python -m client approve --source PATH --kit DIR # approve the code of a MedFed checkout
    python -m client approve --revoke HASH --kit DIR

Everything lives in the hospital's own node folder (``KIT/node`` or
``--home``), under ``apps/``: ``approved.json`` (the hashes it approved),
``offered.json`` (every bundle a run brought, first and last seen, runs),
``bundles/HASH.fab`` (each offered bundle, kept byte for byte for review) and
``installed/HASH/`` (approved bundles, unpacked by Flower's installer). The
server never writes any of it. The hash is :func:`client.bundle.content_hash`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client.bundle import Bundle, BundleError, build_from_source, diff, read_bundle
from common.atomic import atomic_file

HASH = re.compile(r"^[0-9a-f]{64}$")


class ApprovalError(ValueError):
    """An approval file is damaged, or a command names an unknown bundle (message says what)."""


def now() -> str:
    """The time, UTC, to the second, ISO 8601."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def hospital_home(kit: Path | None, home: Path | None) -> Path:
    """The node folder, as ``python -m client`` picks it: ``--home``, else ``KIT/node``.

    Raises:
        ApprovalError: neither was given.
    """
    if home is not None:
        return home.resolve()
    if kit is not None:
        return (kit / "node").resolve()
    raise ApprovalError("pass --kit DIR (this hospital's startup folder) or --home DIR "
                        "(its node folder)")


class AppStore:
    """The hospital's record of offered and approved bundles in ``HOME/apps``."""

    def __init__(self, home: Path) -> None:
        self.folder = home / "apps"
        self.approved_path = self.folder / "approved.json"
        self.offered_path = self.folder / "offered.json"
        self.bundles = self.folder / "bundles"
        self.installed = self.folder / "installed"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive lock on ``apps/.lock`` while a record is read, changed and replaced."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.folder / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def _read(self, path: Path) -> dict[str, dict[str, Any]]:
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ApprovalError(f"{path} is unreadable ({err}); restore it from a backup, "
                                "or delete it and approve again") from None
        if not isinstance(data, dict) or not all(HASH.match(k) for k in data):
            raise ApprovalError(f"{path} is not a MedFed approval file (hash -> details)")
        return data

    def _write(self, path: Path, data: dict[str, dict[str, Any]]) -> None:
        with atomic_file(path, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)

    def approved(self) -> dict[str, dict[str, Any]]:
        """Approved hashes and their details (``label``, ``approved_at``, ``how``)."""
        return self._read(self.approved_path)

    def offered(self) -> dict[str, dict[str, Any]]:
        """Offered hashes and their details (``label``, ``first_seen``, ``runs``, ...)."""
        return self._read(self.offered_path)

    def fab(self, bundle_hash: str) -> bytes:
        """The kept bytes of a bundle.

        Raises:
            ApprovalError: no bundle with this hash was offered or approved here.
        """
        path = self.bundles / f"{bundle_hash}.fab"
        if not HASH.match(bundle_hash) or not path.is_file():
            raise ApprovalError(f"no bundle {bundle_hash!r} was offered to this hospital "
                                f"(see `python -m client apps`; hashes are 64 hex digits)")
        return path.read_bytes()

    def keep(self, bundle: Bundle, fab: bytes) -> None:
        """Keep a bundle's bytes for review (once per hash)."""
        path = self.bundles / f"{bundle.hash}.fab"
        if not path.exists():
            with atomic_file(path) as handle:
                handle.write(fab)

    def record_offer(self, bundle: Bundle, fab: bytes, run_id: int) -> None:
        """Note that run ``run_id`` brought this bundle, and keep it."""
        with self._locked():
            self.keep(bundle, fab)
            offered = self.offered()
            entry = offered.setdefault(bundle.hash, {"label": bundle.label, "first_seen": now(),
                                                     "runs": [], "messages": 0})
            entry["last_seen"], entry["messages"] = now(), entry["messages"] + 1
            if run_id not in entry["runs"]:
                entry["runs"].append(run_id)
            self._write(self.offered_path, offered)

    def approve(self, bundle: Bundle, how: str) -> None:
        """Approve a bundle already kept here."""
        with self._locked():
            approved = self.approved()
            approved[bundle.hash] = {"label": bundle.label, "clientapp": bundle.clientapp,
                                     "approved_at": now(), "how": how}
            self._write(self.approved_path, approved)

    def revoke(self, bundle_hash: str) -> None:
        """Withdraw an approval.

        Raises:
            ApprovalError: the hash is not approved.
        """
        with self._locked():
            approved = self.approved()
            if approved.pop(bundle_hash, None) is None:
                raise ApprovalError(f"{bundle_hash} is not approved here")
            self._write(self.approved_path, approved)


def approve_fab(store: AppStore, fab: bytes, how: str) -> Bundle:
    """Keep and approve a bundle given as bytes; returns it."""
    bundle = read_bundle(fab)
    store.keep(bundle, fab)
    store.approve(bundle, how)
    return bundle


def _latest_approved(store: AppStore, bundle: Bundle) -> str | None:
    """The most recently approved other bundle of the same publisher and name."""
    same = [(d["approved_at"], h) for h, d in store.approved().items()
            if h != bundle.hash and d["label"].split(" ")[0] == bundle.label.split(" ")[0]]
    return max(same)[1] if same else None


def list_apps(store: AppStore) -> list[str]:
    """The ``apps`` listing."""
    approved, offered = store.approved(), store.offered()
    lines = [f"Approved app bundles ({store.approved_path}):"]
    lines += [f"  {h}  {d['label']}  approved {d['approved_at']} ({d['how']})"
              for h, d in sorted(approved.items(), key=lambda kv: kv[1]["approved_at"])]
    lines += ["  (none)"] if not approved else []
    lines.append(f"Offered by runs ({store.offered_path}):")
    for h, d in sorted(offered.items(), key=lambda kv: kv[1]["first_seen"]):
        state = "approved" if h in approved else "NOT APPROVED"
        lines.append(f"  {h}  {d['label']}  first seen {d['first_seen']}  "
                     f"runs {len(d['runs'])}  messages {d['messages']}  {state}")
    lines += ["  (none)"] if not offered else []
    return lines


def review_commands(bundle_hash: str, home: Path) -> str:
    """What to run to review and approve an offered bundle."""
    return (f"review it with `python -m client apps --home {home} --diff {bundle_hash}` "
            f"(or unzip {home / 'apps' / 'bundles' / bundle_hash}.fab), then approve it with "
            f"`python -m client approve {bundle_hash} --home {home}`")


def parse(argv: list[str]) -> argparse.Namespace:
    """``apps`` / ``approve`` command lines (``argv[0]`` is the command name)."""
    name, rest = argv[0], argv[1:]
    p = argparse.ArgumentParser(prog=f"python -m client {name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kit", type=Path, help="this hospital's startup folder (node folder KIT/node)")
    p.add_argument("--home", type=Path, help="the node folder (as given to `python -m client`)")
    if name == "apps":
        group = p.add_mutually_exclusive_group()
        group.add_argument("--show", metavar="HASH", help="list a bundle's files and hashes")
        group.add_argument("--diff", metavar="HASH", help="diff a bundle against --against")
        p.add_argument("--against", metavar="HASH",
                       help="bundle to diff with (default: the latest approved of that app)")
    else:
        p.add_argument("hash", nargs="?", help="the bundle hash (64 hex digits) to approve")
        p.add_argument("--source", type=Path, help="approve the bundle of this app folder, "
                                                   "built as `flwr run` builds it")
        p.add_argument("--revoke", metavar="HASH", help="withdraw an approval")
    args = p.parse_args(rest)
    args.command = name
    if name == "approve" and sum(x is not None for x in (args.hash, args.source,
                                                         args.revoke)) != 1:
        p.error("give exactly one of HASH, --source PATH or --revoke HASH")
    return args


def _apps(store: AppStore, args: argparse.Namespace) -> list[str]:
    if args.show:
        bundle = read_bundle(store.fab(args.show))
        return [f"{bundle.label}  clientapp {bundle.clientapp}  hash {bundle.hash}",
                *(f"  {sha}  {path}" for path, sha in sorted(bundle.files.items()))]
    if args.diff:
        new = read_bundle(store.fab(args.diff))
        against = args.against or _latest_approved(store, new)
        if against is None:
            raise ApprovalError(f"no other approved bundle of {new.label.split(' ')[0]} to "
                                "diff with; pass --against HASH or review with --show")
        changes = diff(store.fab(against), store.fab(args.diff), old_label=against[:12],
                       new_label=args.diff[:12])
        return [line.rstrip("\n") for line in changes] or ["(no file differs)"]
    return list_apps(store)


def _approve(store: AppStore, args: argparse.Namespace) -> list[str]:
    if args.revoke:
        store.revoke(args.revoke)
        return [f"revoked {args.revoke}: runs bringing it are refused from now on"]
    if args.source:
        source = args.source.resolve()
        bundle = approve_fab(store, build_from_source(source), f"built from {source}")
    else:
        bundle = approve_fab(store, store.fab(args.hash), "offered bundle")
    return [f"approved {bundle.hash} ({bundle.label}, clientapp {bundle.clientapp}); "
            "runs bringing it are answered from now on"]


def main(argv: list[str]) -> int:
    """``python -m client apps|approve ...``; the exit code."""
    args = parse(argv)
    try:
        store = AppStore(hospital_home(args.kit, args.home))
        lines = _apps(store, args) if args.command == "apps" else _approve(store, args)
    except (ApprovalError, BundleError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0
