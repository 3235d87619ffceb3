"""Tamper-evident audit trail: append-only JSONL, each record chained to the previous one.

Every record carries ``prev`` (the previous record's hash, 64 zeros for the first)
and ``hash`` = SHA-256 of the record's canonical JSON without ``hash``. Editing,
inserting or deleting a line breaks the chain at that point; ``python -m
rtinfer.audit verify PATH`` reports the first broken link. Each Triton model
instance writes its own file (one chain per file, no cross-process locking on the
request path); records are written per ``execute()`` call in one write (group commit).
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

GENESIS = "0" * 64
ENV_DIR = "RTINFER_AUDIT_DIR"


def canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


class AuditWriter:
    """Appends chained records to one file; continues the chain of an existing file."""

    def __init__(self, path: str | os.PathLike, *, fsync: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        # An exclusive lock: a second writer on the same file would fork the chain.
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.repaired_bytes = self._repair_torn_tail()
        self._head, self._seq = self._read_head()

    def _repair_torn_tail(self) -> int:
        """Drop a partial last line left by a crash mid-write; returns the bytes dropped."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return 0
        with open(self.path, "rb") as fh:
            data = fh.read()
        if data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        os.ftruncate(self._fd, keep)
        return size - keep

    def _read_head(self) -> tuple[str, int]:
        last = None
        with open(self.path, "rb") as fh:
            for line in fh:
                if line.strip():
                    last = line
        if last is None:
            return GENESIS, 0
        rec = json.loads(last)
        return rec["hash"], rec["seq"] + 1

    @property
    def head(self) -> str:
        return self._head

    def append(self, records: list[dict]) -> list[str]:
        """Chain and write ``records`` in one write; returns their hashes."""
        if not records:
            return []
        with self._lock:
            lines, hashes = [], []
            head, seq = self._head, self._seq
            for rec in records:
                rec = dict(rec, seq=seq, prev=head)
                rec["hash"] = head = record_hash(rec)
                seq += 1
                hashes.append(head)
                lines.append(canonical(rec) + b"\n")
            os.write(self._fd, b"".join(lines))
            if self.fsync:
                os.fsync(self._fd)
            self._head, self._seq = head, seq
            return hashes

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class Report:
    path: str
    records: int = 0
    ok: bool = True
    broken_at: int | None = None  # 1-based line number of the first broken link
    reason: str = ""
    torn_tail: bool = False
    head: str = GENESIS
    problems: list = field(default_factory=list)


def verify_file(path: str | os.PathLike) -> Report:
    path = Path(path)
    report = Report(str(path))
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail:
        report.torn_tail = True
    prev, seq = GENESIS, 0
    for lineno, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            claimed = rec["hash"]
        except (ValueError, KeyError, TypeError):
            return _broken(report, lineno, "line is not a JSON audit record")
        if rec.get("prev") != prev:
            return _broken(report, lineno, "prev does not match the previous record's hash "
                                           "(a record was deleted, inserted or reordered)")
        if rec.get("seq") != seq:
            return _broken(report, lineno, f"seq is {rec.get('seq')}, expected {seq}")
        if record_hash(rec) != claimed:
            return _broken(report, lineno, "hash does not match the record's content (the record was edited)")
        prev, seq = claimed, seq + 1
        report.records += 1
    report.head = prev
    return report


def _broken(report: Report, lineno: int, reason: str) -> Report:
    report.ok, report.broken_at, report.reason = False, lineno, reason
    return report


def audit_files(path: str | os.PathLike) -> list[Path]:
    path = Path(path)
    return sorted(path.glob("*.jsonl")) if path.is_dir() else [path]


def read_records(path: str | os.PathLike) -> list[dict]:
    """All complete records of a file or directory (no verification)."""
    out = []
    for f in audit_files(path):
        for line in f.read_bytes().split(b"\n"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rtinfer.audit")
    sub = parser.add_subparsers(dest="cmd", required=True)
    ver = sub.add_parser("verify", help="check the hash chain of an audit file or a directory of them")
    ver.add_argument("path")
    args = parser.parse_args(argv)
    status = 0
    for f in audit_files(args.path):
        rep = verify_file(f)
        if rep.ok:
            tail = " (torn tail: a partial last line, from a crash mid-write)" if rep.torn_tail else ""
            print(f"OK      {f}: {rep.records} records, head {rep.head[:16]}{tail}")
        else:
            status = 1
            print(f"BROKEN  {f}: line {rep.broken_at}: {rep.reason} ({rep.records} records verified before it)")
    return status


if __name__ == "__main__":
    sys.exit(main())
