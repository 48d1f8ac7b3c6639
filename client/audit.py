"""The hospital's own record of every reply it sent: an append-only, hash-chained log.

    python -m client audit --kit DIR            # print the record and verify its chain
    python -m client audit --home DIR --expect HASH

``HOME/audit.jsonl`` holds one JSON object per message the hospital
answered, written by the hospital's runner (``client/task.py``) after the
approved app's reply is final and right before it is handed to the node for
sending; never by app code from a bundle. Each entry says: ``seq`` (1, 2,
...), ``time`` (UTC), ``run_id``, ``node_id``, ``app_hash`` (the bundle hash,
:mod:`client.bundle`), ``message_type`` and ``round`` of the message
answered, and what the reply carried: ``arrays`` (record, name, shape,
dtype and ``sha256``, the SHA-256 of the array's bytes as serialized in the
reply: values are recorded as digests, not in clear), ``metrics`` (record
-> name -> value, in clear), ``configs`` (the same, bytes as digests),
``epsilon`` (the reply's ``epsilon`` metric, None without one) and, for an
error reply, ``error`` (code and reason).

Each entry holds ``prev``, the ``hash`` of the entry before it (64 zeros for
the first), and its own ``hash`` = SHA-256 of ``prev`` followed by the
entry's canonical JSON (every key but ``hash``, sorted, no spaces). Editing,
removing, inserting or reordering entries breaks the chain at the first
entry affected, which ``audit`` names. What the chain cannot show on its own:
the newest entries cut off, or the whole file rewritten with a new chain by
someone with write access to it; against that, keep the head hash that
``audit`` prints somewhere else and check it later with ``--expect HASH``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from client.approval import ApprovalError, hospital_home, now
from common.wire import EPSILON

AUDIT_FILE = "audit.jsonl"
GENESIS = "0" * 64

Entry = dict[str, Any]

if TYPE_CHECKING:
    from flwr.app import Message


class AuditError(RuntimeError):
    """The record cannot be read or extended (the message names the file and line)."""


def _value(value: object) -> object:
    """A record value as JSON: bytes as their SHA-256, lists element-wise."""
    if isinstance(value, bytes):
        return {"sha256": hashlib.sha256(value).hexdigest(), "bytes": len(value)}
    if isinstance(value, list):
        return [_value(v) for v in value]
    return value


def describe(reply: Message) -> Entry:
    """What a reply carries, as the audit fields ``arrays``/``metrics``/``configs``/``error``."""
    if reply.has_error():
        return {"arrays": [], "metrics": {}, "configs": {}, "epsilon": None,
                "error": {"code": int(reply.error.code), "reason": str(reply.error.reason)}}
    content = reply.content
    arrays = [{"record": name, "name": key, "shape": list(array.shape), "dtype": array.dtype,
               "sha256": hashlib.sha256(array.data).hexdigest()}
              for name, record in content.array_records.items() for key, array in record.items()]
    metrics = {name: {key: _value(v) for key, v in record.items()}
               for name, record in content.metric_records.items()}
    configs = {name: {key: _value(v) for key, v in record.items()}
               for name, record in content.config_records.items()}
    epsilon = next((m[EPSILON] for m in metrics.values() if EPSILON in m), None)
    return {"arrays": arrays, "metrics": metrics, "configs": configs, "epsilon": epsilon,
            "error": None}


def canonical(entry: Entry) -> str:
    """The entry's canonical JSON: every key but ``hash``, sorted, compact."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def entry_hash(entry: Entry) -> str:
    """SHA-256 (hex) of ``prev`` followed by the canonical JSON of the entry."""
    return hashlib.sha256((entry["prev"] + canonical(entry)).encode()).hexdigest()


def _last_line(handle: IO[bytes]) -> bytes:
    """The file's last non-empty line, read backwards from the end."""
    end = handle.seek(0, os.SEEK_END)
    tail, position = b"", end
    while position > 0 and tail.strip(b"\n").count(b"\n") < 1:
        position = max(0, position - 65536)
        handle.seek(position)
        tail = handle.read(end - position)
    lines = tail.strip(b"\n").split(b"\n")
    return lines[-1] if lines and lines[-1] else b""


def append(path: Path, fields: Entry) -> Entry:
    """Append one entry (``fields`` plus ``seq``, ``time``, ``prev``, ``hash``); returns it.

    Holds an exclusive lock on the file from reading the last entry to
    writing the new one, and syncs it to disk before returning.

    Raises:
        AuditError: the file cannot be opened, or its last entry is unreadable.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        handle = open(path, "a+b")  # noqa: SIM115 - closed below
    except OSError as err:
        raise AuditError(f"cannot open the audit record {path}: {err}") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        last = _last_line(handle)
        try:
            previous: Entry = json.loads(last) if last else {"seq": 0, "hash": GENESIS}
            seq, prev = int(previous["seq"]) + 1, str(previous["hash"])
        except (ValueError, KeyError, TypeError):
            raise AuditError(f"the last entry of {path} is unreadable; run "
                             "`python -m client audit` to see where the record broke") from None
        entry = {**fields, "seq": seq, "time": now(), "prev": prev}
        entry["hash"] = entry_hash(entry)
        handle.write((json.dumps(entry, sort_keys=True, ensure_ascii=True) + "\n").encode())
        handle.flush()
        os.fsync(handle.fileno())
    return entry


@dataclass(frozen=True)
class Verdict:
    """What verifying a record found.

    Attributes:
        entries: the entries that verified, in order.
        problem: why the chain breaks at the first bad entry; None when it holds.
    """

    entries: list[Entry]
    problem: str | None

    @property
    def head(self) -> str:
        """Hash of the last entry that verified (64 zeros for none)."""
        return self.entries[-1]["hash"] if self.entries else GENESIS


def verify(path: Path) -> Verdict:
    """Check every entry's hash and its link to the one before, stopping at the first bad one."""
    good: list[Entry] = []
    prev, seq = GENESIS, 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        where = f"entry on line {number}"
        try:
            entry = json.loads(line)
            claimed, own = entry["prev"], entry["hash"]
        except (ValueError, KeyError, TypeError):
            return Verdict(good, f"{where}: not a MedFed audit entry (damaged or edited)")
        if entry_hash(entry) != own:
            return Verdict(good, f"{where} (seq {entry.get('seq')}): its content does not "
                                 "match its hash: it was edited")
        if claimed != prev or entry.get("seq") != seq + 1:
            return Verdict(good, f"{where} (seq {entry.get('seq')}): does not follow the entry "
                                 f"before it (seq {seq}): entries were removed, inserted or "
                                 "reordered here")
        good.append(entry)
        prev, seq = own, seq + 1
    return Verdict(good, None)


def row(entry: Entry) -> str:
    """One printed line per entry."""
    head = (f"#{entry['seq']} {entry['time']} run {entry['run_id']} round {entry['round']} "
            f"{entry['message_type']} app {str(entry['app_hash'])[:12]}")
    if entry["error"]:
        return f"{head} ERROR {entry['error']['code']}: {entry['error']['reason']}"
    arrays = entry["arrays"]
    values = sum(math.prod(a["shape"]) for a in arrays)
    metrics = ", ".join(f"{k}={v}" for m in entry["metrics"].values() for k, v in m.items())
    epsilon = "" if entry["epsilon"] is None else f" epsilon {entry['epsilon']}"
    return (f"{head} arrays {len(arrays)} ({values} values, SHA-256 each) "
            f"metrics [{metrics}]{epsilon}")


def main(argv: list[str]) -> int:
    """``python -m client audit``: print the record, verify it; 0 only if it holds."""
    p = argparse.ArgumentParser(prog="python -m client audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kit", type=Path, help="this hospital's startup folder (node folder KIT/node)")
    p.add_argument("--home", type=Path, help="the node folder (as given to `python -m client`)")
    p.add_argument("--expect", metavar="HASH", help="also require an entry with this hash "
                                                    "(a head hash printed earlier)")
    p.add_argument("--quiet", action="store_true", help="print only the verdict")
    args = p.parse_args(argv)
    try:
        path = hospital_home(args.kit, args.home) / AUDIT_FILE
    except ApprovalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not path.exists():
        print(f"{path}: no reply recorded yet")
        return 0 if args.expect is None else 1
    verdict = verify(path)
    if not args.quiet:
        for entry in verdict.entries:
            print(row(entry))
    if verdict.problem:
        print(f"error: {path}: the chain breaks at the {verdict.problem}; {len(verdict.entries)} "
              "entries before it verify", file=sys.stderr)
        return 1
    if args.expect and args.expect not in {e["hash"] for e in verdict.entries}:
        print(f"error: {path}: no entry has hash {args.expect}: entries up to it were removed "
              "or the record was rewritten", file=sys.stderr)
        return 1
    print(f"{path}: {len(verdict.entries)} entries, chain verified; head {verdict.head}")
    return 0
