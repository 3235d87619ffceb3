"""Tamper-evident audit trail: append-only JSONL, each record chained to the previous one.

Every record carries ``seq``, ``prev`` (the previous record's hash, 64 zeros for the
first) and ``hash`` = SHA-256 of the record's canonical JSON without ``hash``.
Editing, inserting or deleting a line breaks the chain at that point. Each Triton
model instance writes its own chain (no cross-process locking on the request
path); records of one ``execute()`` call go out in one write (group commit).

Durability: a crash mid-write leaves at most one partial last line, which
``verify`` reports as a torn tail and the writer cuts off on restart before it
continues the chain. ``fsync`` policy: ``batch`` (every write is durable before the
response), ``interval`` (a background fsync every ``fsync_interval_s``: a power cut
loses at most that much), ``off`` (the page cache only: survives a process crash,
not a power cut). Rotation: past ``max_bytes`` the file ``<chain>.jsonl`` is
renamed ``<chain>.<NNNNNN>.jsonl`` and the chain goes on in a fresh file.
Checkpoints: with a signer, a signed record of the chain head (``rtinfer.checkpoint``).
In a fleet, every record and checkpoint names its replica (``replica``), and checkpoints
sign the fleet's replica ids as the replica knows them (``fleet``).

The writer's state always equals the disk: a write that fails or stops short (disk
full, file size limit) is cut back to where the batch began and the chain's head
rolled back with it, so the next write and a restart continue the chain. When the
cut itself fails, the writer rereads its head from the file before the next write.
Files are created 0600.

``python -m rtinfer.audit verify PATH [--public-key PUB]`` checks every chain of a
directory across its files, and fails on what is missing: no chain at all, a chain
that a checkpoint names (each checkpoint signs the list of chains present when it was
written) but whose files are gone, and any line that is not byte for byte the
canonical form the writer writes (so a reader that keeps the first of two duplicate
keys cannot be shown other values than the hash covers).
``python -m rtinfer.audit verify DIR DIR ...`` or ``verify FLEET_ROOT`` (a directory whose
subdirectories are replicas' audit directories) verifies a fleet (``verify_fleet``): every
replica's chains as above, records and checkpoints naming one replica per directory and each
replica in one directory only, every replica that a checkpoint's ``fleet`` names present, and
no request id served by two replicas nor any envelope served twice (a replay let through).
It prints each replica's record counts, the total, and which replicas fail.
``python -m rtinfer.audit bench`` measures the fsync cost.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rtinfer import checkpoint

GENESIS = "0" * 64
ENV_DIR = "RTINFER_AUDIT_DIR"
FSYNC_POLICIES = ("off", "batch", "interval")
_SEGMENT = re.compile(r"^(?P<chain>.+)\.(?P<n>\d{6})$")


def canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def fsync_policy(value) -> str:
    """'batch' | 'interval' | 'off'; true/false kept for older configs."""
    v = str(value).strip().lower()
    v = {"true": "batch", "1": "batch", "yes": "batch", "false": "off", "0": "off", "no": "off", "": "off"}.get(v, v)
    if v not in FSYNC_POLICIES:
        raise ValueError(f"audit fsync policy must be one of {FSYNC_POLICIES}, not {value!r}")
    return v


def split_name(path: Path) -> tuple[str, float]:
    """(chain, position): rotated segments by number, the live file last."""
    base = path.name[:-len(".jsonl")]
    m = _SEGMENT.match(base)
    return (m["chain"], int(m["n"])) if m else (base, float("inf"))


def chains(path: str | os.PathLike) -> dict[str, list[Path]]:
    """Chain name -> its files in order (segments, then the live file)."""
    out: dict[str, list] = {}
    for f in audit_files(path):
        chain, pos = split_name(f)
        out.setdefault(chain, []).append((pos, f))
    return {c: [f for _, f in sorted(v)] for c, v in sorted(out.items())}


def now_iso() -> str:
    """Now, UTC, to the millisecond: the ``time`` of every audit record and checkpoint."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def parse_line(line: bytes) -> dict:
    """A record from one line (without its newline), only if the line is exactly its canonical form."""
    rec = json.loads(line, object_pairs_hook=_no_duplicates)
    if not isinstance(rec, dict) or canonical(rec) != line:
        raise ValueError("not canonical")
    return rec


def _last_record(path: Path) -> dict | None:
    last = None
    with open(path, "rb") as fh:
        for line in fh:
            if line.endswith(b"\n") and line.strip():
                last = line
    return json.loads(last) if last else None


class AuditWriter:
    """Appends chained records to ``<dir>/<chain>.jsonl``; continues the chain of existing files."""

    def __init__(self, path: str | os.PathLike, *, fsync="off", fsync_interval_s: float = 1.0,
                 max_bytes: int = 0, signer: checkpoint.Signer | None = None,
                 checkpoint_interval_s: float = 30.0, checkpoint_records: int = 1000,
                 lock_timeout_s: float = 0.0, replica: str | None = None, fleet: list[str] | None = None):
        """``replica``: the fleet replica this chain belongs to (every record names it); ``fleet``: the
        fleet's replica ids as this replica knows them (its checkpoints sign them)."""
        self.path = Path(path)
        self.replica = replica
        self.fleet = sorted(set(fleet) | ({replica} if replica else set())) if fleet is not None else None
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new trail's directory: owner only
        self.chain = self.path.name[:-len(".jsonl")] if self.path.name.endswith(".jsonl") else self.path.name
        self.policy = fsync_policy(fsync)
        self.fsync_interval_s = fsync_interval_s
        self.max_bytes = max_bytes
        self.signer = signer
        self.checkpoint_interval_s = checkpoint_interval_s
        self.checkpoint_records = checkpoint_records
        self._lock = threading.Lock()
        self._fd = self._open_locked(lock_timeout_s)
        self.repaired_bytes = self._repair_torn_tail()
        self._head, self._seq, self._unsigned = self._read_head()
        self._size = os.fstat(self._fd).st_size
        self._stale = False  # a failed write could not be cut back: reread the head before the next one
        self.write_errors = 0
        self.records_written = 0  # request records (checkpoints counted in ``checkpoints``), for metrics
        self._dirty = False
        self._last_sync = self._last_ckpt = time.monotonic()
        self.fsyncs = self.checkpoints = self.rotations = 0
        self._stop = threading.Event()
        self._thread = None
        if self.policy == "interval" or signer is not None:
            self._thread = threading.Thread(target=self._background, name=f"audit-{self.chain}", daemon=True)
            self._thread.start()

    def _open_locked(self, timeout_s: float) -> int:
        """Open and flock the live file; a second writer would fork the chain. Waits up to
        ``timeout_s`` for a previous server's process to finish exiting."""
        deadline = time.monotonic() + timeout_s
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)
                continue
            if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                if os.fstat(fd).st_mode & 0o077:  # older trails were 0640: results are not for group readers
                    os.fchmod(fd, 0o600)
                return fd
            os.close(fd)  # renamed away by a rotation while we waited: lock the new live file

    def _repair_torn_tail(self) -> int:
        """Drop a partial last line left by a crash mid-write; returns the bytes dropped."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return 0
        with open(self.path, "rb") as fh:
            fh.seek(max(0, size - 1))
            if fh.read(1) == b"\n":
                return 0
            fh.seek(0)
            data = fh.read()
        keep = data.rfind(b"\n") + 1
        os.ftruncate(self._fd, keep)
        os.fsync(self._fd)
        return size - keep

    def _segments(self) -> list[Path]:
        return [f for f in chains(self.path.parent).get(self.chain, []) if f != self.path]

    def _read_head(self) -> tuple[str, int, int]:
        """(head, next seq, records after the last checkpoint) of the live file, or of the newest
        segment when the live file is new (a crash between a rotation's rename and its first write).
        The live file must verify (links, and signatures when signing): records a crash left
        unsigned are signed by this writer's next checkpoint, so they are checked first."""
        rep = verify_file(self.path, prev=None, public=self.signer.public if self.signer else None)
        if not rep.ok:
            raise RuntimeError(f"audit file {self.path} does not verify at line {rep.broken_at}: {rep.reason}; "
                               "move it aside for investigation before restarting")
        for f in [self.path, *reversed(self._segments())]:
            rec = _last_record(f)
            if rec is not None:
                return rec["hash"], rec["seq"] + 1, rep.unsigned if f == self.path else 0
        return GENESIS, 0, 0

    @property
    def head(self) -> str:
        return self._head

    def checkpoint_lag(self) -> tuple[int, float]:
        """(records after the last signed checkpoint, seconds since it while any are unsigned, else 0)."""
        unsigned = self._unsigned
        return unsigned, (time.monotonic() - self._last_ckpt) if unsigned else 0.0

    def _chain(self, records: list[dict]) -> tuple[list[bytes], list[str]]:
        lines, hashes = [], []
        for rec in records:
            rec = dict(_encodable(rec), seq=self._seq, prev=self._head)
            if self.replica is not None:
                rec["replica"] = self.replica
            rec["hash"] = self._head = record_hash(rec)
            self._seq += 1
            hashes.append(self._head)
            lines.append(canonical(rec) + b"\n")
        return lines, hashes

    def _checkpoint_lines(self) -> list[bytes]:
        present = sorted(set(chains(self.path.parent)) | {self.chain})
        ckpt = self.signer.checkpoint(self.chain, self._seq - 1, self._head, now_iso(), chains=present,
                                      replica=self.replica, fleet=self.fleet)
        self._unsigned, self._last_ckpt = 0, time.monotonic()
        self.checkpoints += 1
        return self._chain([ckpt])[0]

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._size += len(data)
        self._dirty = True

    def _sync(self) -> None:
        os.fsync(self._fd)
        self._dirty, self._last_sync = False, time.monotonic()
        self.fsyncs += 1

    def _commit(self, build) -> list[str]:
        """Chain the lines ``build()`` makes and write them, all or nothing (call with the lock held).

        On failure the file is cut back to where this write began and the chain state rolled
        back, so what the writer believes is what is on disk; if the cut fails, the head is
        reread from the file before the next write. Returns the new records' hashes."""
        if self._stale:
            self._reload()
        state = (self._head, self._seq, self._unsigned, self._last_ckpt, self.checkpoints)
        offset = self._size
        try:
            lines, hashes = build()
            self._write(b"".join(lines))
        except BaseException:
            self.write_errors += 1
            self._head, self._seq, self._unsigned, self._last_ckpt, self.checkpoints = state
            try:
                os.ftruncate(self._fd, offset)
                self._size = offset
            except OSError:
                self._stale = True
            raise
        return hashes

    def _reload(self) -> None:
        """Make the state equal the disk again: drop a partial line, reread head, seq and size."""
        self._repair_torn_tail()
        self._head, self._seq, self._unsigned = self._read_head()
        self._size = os.fstat(self._fd).st_size
        self._stale = False

    def append(self, records: list[dict]) -> list[str]:
        """Chain and write ``records`` in one write (plus a checkpoint when due); returns their hashes.
        Raises OSError when they could not be written (then none of them is on disk)."""
        if not records:
            return []
        with self._lock:
            def build():
                lines, hashes = self._chain(records)
                self._unsigned += len(records)
                if self.signer is not None and self._unsigned >= self.checkpoint_records:
                    lines += self._checkpoint_lines()
                return lines, hashes
            hashes = self._commit(build)
            self.records_written += len(records)
            if self.policy == "batch":
                self._sync()
            if self.max_bytes and self._size >= self.max_bytes:
                try:
                    self._rotate()
                except OSError as exc:  # the records are written; rotation is tried again on the next write
                    _warn(f"audit {self.chain}: rotation failed, retried later: {exc}")
            return hashes

    def _rotate(self) -> None:
        """Seal the live file (checkpoint, fsync), rename it to the next segment, go on in a new one."""
        if self.signer is not None and self._unsigned:
            self._commit(lambda: (self._checkpoint_lines(), []))
        self._sync()
        segs = [split_name(f)[1] for f in self._segments()]
        target = self.path.with_name(f"{self.chain}.{int(max(segs, default=0)) + 1:06d}.jsonl")
        os.rename(self.path, target)
        old = self._fd
        self._fd = self._open_locked(0)
        os.close(old)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the rename and the new file survive a power cut
        finally:
            os.close(dfd)
        self._size = 0
        self.rotations += 1

    def _background(self) -> None:
        period = min(self.fsync_interval_s if self.policy == "interval" else 3600,
                     self.checkpoint_interval_s if self.signer else 3600)
        while not self._stop.wait(max(0.01, period / 2)):
            with self._lock:
                if self._fd < 0:
                    return
                now = time.monotonic()
                try:
                    if self.signer and self._unsigned and now - self._last_ckpt >= self.checkpoint_interval_s:
                        self._commit(lambda: (self._checkpoint_lines(), []))
                        if self.policy == "batch":
                            self._sync()
                    if self.policy == "interval" and self._dirty and now - self._last_sync >= self.fsync_interval_s:
                        self._sync()
                except Exception as exc:  # noqa: BLE001 - e.g. disk full: the thread lives on and tries again
                    self._last_ckpt = self._last_sync = now
                    _warn(f"audit {self.chain}: background checkpoint/fsync failed, retried later: {exc}")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            if self._fd < 0:
                return
            try:
                if self.signer is not None and self._unsigned:
                    self._commit(lambda: (self._checkpoint_lines(), []))
                if self.policy != "off" and self._dirty:
                    self._sync()
            except OSError as exc:  # the chain on disk is whole; the next writer signs the tail
                _warn(f"audit {self.chain}: closing checkpoint/fsync failed: {exc}")
            finally:
                os.close(self._fd)
                self._fd = -1


def _encodable(value):
    """``value`` with strings that UTF-8 cannot hold (lone surrogates, which JSON escapes can carry in
    from a client) made printable: a record must never fail to serialize because of what a client sent."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_encodable(k): _encodable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encodable(v) for v in value]
    return value


def _warn(msg: str) -> None:
    print(f"rtinfer.audit: {msg}", file=sys.stderr, flush=True)


FIRST_LINK = ("the first record does not continue where the chain stood before this file "
              "(a file or the first records are missing, or the file was replaced)")


@dataclass
class Report:
    path: str
    records: int = 0
    ok: bool = True
    broken_at: int | None = None  # 1-based line number of the first broken link
    reason: str = ""
    torn_tail: bool = False
    head: str = GENESIS
    next_seq: int = 0
    checkpoints: int = 0  # valid signed checkpoints (with a public key)
    unsigned: int = 0  # records after the last valid checkpoint
    problems: list = field(default_factory=list)
    named_chains: set = field(default_factory=set)  # chains its checkpoints say existed
    replicas: set = field(default_factory=set)  # the replicas its records name
    named_replicas: set = field(default_factory=set)  # the fleet its checkpoints say existed
    events: dict = field(default_factory=dict)  # records by event (served, rejected, checkpoint)


def verify_file(path: str | os.PathLike, *, prev: str | None = GENESIS, seq: int | None = 0,
                public=None) -> Report:
    """Check one file's links. ``prev``/``seq``: where the previous file ended (default: the genesis;
    None: take the file's own first record as the start, for a segment checked on its own).
    ``public``: an Ed25519 public key; every checkpoint record must carry a valid signature of its head."""
    path = Path(path)
    report = Report(str(path))
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail:
        report.torn_tail = True
    chain = split_name(path)[0] if path.name.endswith(".jsonl") else path.name
    for lineno, line in enumerate(lines, 1):
        try:
            rec = json.loads(line, object_pairs_hook=_no_duplicates)
            claimed = rec["hash"]
        except (ValueError, KeyError, TypeError, RecursionError):
            return _broken(report, lineno, "line is not a JSON audit record (or has a duplicate key)")
        if lineno == 1 and prev is None:
            prev, seq = rec.get("prev"), rec.get("seq")
            if not isinstance(seq, int) or (seq == 0) != (prev == GENESIS):
                return _broken(report, lineno, "first record's seq and prev do not fit together")
        if rec.get("prev") != prev:
            return _broken(report, lineno, FIRST_LINK if lineno == 1 else "prev does not match the previous "
                           "record's hash (a record was deleted, inserted or reordered)")
        if rec.get("seq") != seq:
            return _broken(report, lineno, f"seq is {rec.get('seq')}, expected {seq}")
        if record_hash(rec) != claimed:
            return _broken(report, lineno, "hash does not match the record's content (the record was edited)")
        if canonical(rec) != line:
            return _broken(report, lineno, "line is not in the canonical form the writer writes "
                           "(key order, spacing or escapes differ): its bytes are not what the hash covers")
        report.unsigned += 1
        if public is not None and rec.get("event") == "checkpoint":
            why = checkpoint.check(rec, public)
            c = rec.get("checkpoint") if isinstance(rec.get("checkpoint"), dict) else {}
            if not why and (c.get("head") != prev or c.get("seq") != seq - 1 or c.get("chain") != chain):
                why = "checkpoint does not sign this chain's head at this point"
            if not why and c.get("replica") != rec.get("replica"):
                why = "checkpoint signs another replica than its record names"
            if why:
                return _broken(report, lineno, why)
            report.checkpoints += 1
            report.unsigned = 0
        body = rec.get("checkpoint") if rec.get("event") == "checkpoint" else None
        if isinstance(body, dict) and isinstance(body.get("chains"), list):
            report.named_chains.update(n for n in body["chains"] if isinstance(n, str))
        if isinstance(body, dict) and isinstance(body.get("fleet"), list):
            report.named_replicas.update(n for n in body["fleet"] if isinstance(n, str))
        if rec.get("replica") is not None:
            report.replicas.add(str(rec["replica"]))
        event = str(rec.get("event"))
        report.events[event] = report.events.get(event, 0) + 1
        prev, seq = claimed, seq + 1
        report.records += 1
    report.head = prev if prev is not None else GENESIS
    report.next_seq = seq if seq is not None else 0
    return report


def verify_chain(files: list[Path], *, public=None) -> list[Report]:
    """One chain across its files: each file must start where the previous one ended; the first
    starts at the genesis; only the last may have a torn tail. Stops at the first break."""
    reports, prev, seq, unsigned = [], GENESIS, 0, 0
    for i, f in enumerate(files):
        rep = verify_file(f, prev=prev, seq=seq, public=public)
        if rep.ok and rep.torn_tail and i < len(files) - 1:
            _broken(rep, rep.records + 1, "partial line inside a rotated file (only the live file may have one)")
        if rep.checkpoints == 0:
            rep.unsigned += unsigned
        unsigned = rep.unsigned
        reports.append(rep)
        if not rep.ok:
            break
        prev, seq = rep.head, rep.next_seq
    return reports


def verify_path(path: str | os.PathLike, *, public=None) -> dict[str, list[Report]]:
    """Every chain of a directory (or one file). A directory with no chain, or without a chain that a
    checkpoint names, fails: deleting the whole trail, or one instance's, must not pass."""
    path = Path(path)
    if not path.is_dir():
        return {path.name: [verify_file(path, prev=GENESIS, seq=0, public=public)]}
    result = {c: verify_chain(fs, public=public) for c, fs in chains(path).items()}
    if not result:
        return {"(none)": [_broken(Report(str(path)), 0, "no audit chain in this directory (*.jsonl)")]}
    named: dict[str, str] = {}
    for chain, reports in result.items():
        for rep in reports:
            for n in rep.named_chains:
                named.setdefault(n, chain)
    for missing in sorted(set(named) - set(result)):
        result[missing] = [_broken(Report(str(path / f"{missing}.jsonl")), 0,
                                   f"chain {missing} is missing: a checkpoint of chain {named[missing]} "
                                   "names it, but none of its files is here")]
    return result


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


@dataclass
class ReplicaReport:
    """One replica's audit directory in a fleet verify."""
    replica: str
    path: str
    chains: dict[str, list[Report]]
    problems: list = field(default_factory=list)

    def _count(self, event: str | None) -> int:
        return sum(r.events.get(event, 0) if event else r.records - r.events.get("checkpoint", 0)
                   for reps in self.chains.values() for r in reps)

    @property
    def records(self) -> int:
        """Request records (served, rejected), checkpoints not counted."""
        return self._count(None)

    @property
    def served(self) -> int:
        return self._count("served")

    @property
    def checkpoints(self) -> int:
        return self._count("checkpoint")

    @property
    def ok(self) -> bool:
        return not self.problems and all(r.ok for reps in self.chains.values() for r in reps)


@dataclass
class FleetReport:
    replicas: list[ReplicaReport]
    problems: list = field(default_factory=list)  # (message, replicas it concerns)

    @property
    def failed(self) -> list[str]:
        """The replicas that fail: broken or inconsistent directories, missing ones, those in a duplicate."""
        out = {r.replica for r in self.replicas if not r.ok}
        for _, names in self.problems:
            out.update(names)
        return sorted(out)

    @property
    def ok(self) -> bool:
        return bool(self.replicas) and not self.problems and all(r.ok for r in self.replicas)

    @property
    def records(self) -> int:
        return sum(r.records for r in self.replicas)


def replica_dirs(paths) -> list[Path]:
    """Each path is a replica's audit directory (it holds chains), or a fleet root: then each of its
    subdirectories that holds chains is one (other subdirectories are not audit directories)."""
    out = []
    for path in map(Path, paths):
        if not path.is_dir() or audit_files(path):
            out.append(path)
        else:
            out.extend(d for d in sorted(path.iterdir()) if d.is_dir() and audit_files(d))
    return out


def verify_fleet(paths, *, public=None) -> FleetReport:
    """Every replica of a fleet (``replica_dirs(paths)``). Fails on: a broken chain or checkpoint in any
    replica (``verify_path``); a directory whose records name several replicas; a replica found in two
    directories (one copied over another's deleted one); a replica that a checkpoint's ``fleet`` names
    but none of the directories holds; a request id served by two replicas; an envelope served twice."""
    fleet = FleetReport([])
    for d in replica_dirs(paths):
        result = verify_path(d, public=public)
        named = set().union(*(r.replicas for reps in result.values() for r in reps))
        rep = ReplicaReport(next(iter(named)) if len(named) == 1 else d.name, str(d), result)
        if len(named) > 1:
            rep.problems.append(f"records of several replicas in one directory ({', '.join(sorted(named))}): "
                                "one directory per replica")
        elif not named and any(r.records for reps in result.values() for r in reps):
            rep.problems.append("its records name no replica: it was not written by a replica of a fleet "
                                "(set RTINFER_REPLICA_ID)")
        fleet.replicas.append(rep)
    if not fleet.replicas:
        fleet.problems.append(("no replica audit directory (with *.jsonl chains) in " +
                               ", ".join(map(str, paths)), []))
        return fleet
    where: dict[str, list[str]] = {}
    for rep in fleet.replicas:
        where.setdefault(rep.replica, []).append(rep.path)
    for rid, dirs in sorted(where.items()):
        if len(dirs) > 1:
            fleet.problems.append((f"replica {rid} is in {len(dirs)} directories ({', '.join(dirs)}): "
                                   "one was copied, or two replicas were given one id", [rid]))
    for rep in fleet.replicas:
        named = set().union(*(r.named_replicas for reps in rep.chains.values() for r in reps))
        for missing in sorted(named - set(where)):
            fleet.problems.append((f"replica {missing} is missing: checkpoints of {rep.replica} name it "
                                   "as one of the fleet, but no directory of it is here", [missing]))
    fleet.problems.extend(_served_twice(fleet.replicas))
    return fleet


def _served_twice(replicas: list[ReplicaReport]) -> list[tuple[str, list[str]]]:
    by_id: dict[str, set] = {}
    by_envelope: dict[str, list] = {}
    for rep in replicas:
        for rec in read_records(rep.path):
            if not isinstance(rec, dict) or rec.get("event") != "served":
                continue
            if rec.get("request_id"):
                by_id.setdefault(str(rec["request_id"]), set()).add(rep.replica)
            if rec.get("envelope_sha256"):
                by_envelope.setdefault(str(rec["envelope_sha256"]), []).append(rep.replica)
    out = [(f"request id {rid!r} was served by {len(reps)} replicas ({', '.join(sorted(reps))})", sorted(reps))
           for rid, reps in sorted(by_id.items()) if len(reps) > 1]
    out += [(f"envelope {env[:16]}... was served {len(reps)} times ({', '.join(sorted(reps))}): "
             "a replay was let through", sorted(set(reps)))
            for env, reps in sorted(by_envelope.items()) if len(reps) > 1]
    return out


def bench(batches: int = 300, batch: int = 8, directory: str | None = None) -> list[dict]:
    """Cost of each fsync policy: mean microseconds per write of ``batch`` records (a dynamic batch)."""
    rows = []
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        for policy in FSYNC_POLICIES:
            w = AuditWriter(Path(tmp) / f"bench-{policy}.jsonl", fsync=policy, fsync_interval_s=0.1)
            recs = [{"event": "served", "request_id": f"r{i}", "client_id": "bench", "top1": {"index": 1}}
                    for i in range(batch)]
            t0 = time.perf_counter()
            for _ in range(batches):
                w.append(recs)
            dt = time.perf_counter() - t0
            fsyncs = w.fsyncs
            w.close()
            rows.append({"policy": policy, "us_per_batch": dt / batches * 1e6,
                         "us_per_record": dt / batches / batch * 1e6, "fsyncs": fsyncs})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rtinfer.audit")
    sub = parser.add_subparsers(dest="cmd", required=True)
    ver = sub.add_parser("verify", help="check the hash chains of an audit file or a directory of them; "
                         "several replicas' directories, or a fleet root: the fleet")
    ver.add_argument("path", nargs="+", help="an audit file or directory; several replicas' directories, or a "
                     "fleet root (its subdirectories are the replicas' audit directories)")
    ver.add_argument("--public-key", help="Ed25519 public key (PEM): check the signed checkpoints")
    ver.add_argument("--max-unsigned", type=int, default=None,
                     help="with --public-key: fail when more records than this follow a chain's last checkpoint")
    b = sub.add_parser("bench", help="measure the cost of each fsync policy")
    b.add_argument("--batches", type=int, default=300)
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--dir", help="directory on the file system to measure (default: the system temp dir)")
    args = parser.parse_args(argv)
    if args.cmd == "bench":
        for row in bench(args.batches, args.batch, args.dir):
            print(f"{row['policy']:8s} {row['us_per_batch']:9.1f} us/write of {args.batch} records "
                  f"({row['us_per_record']:.1f} us/record, {row['fsyncs']} fsyncs)")
        return 0
    public = checkpoint.load_public(args.public_key) if args.public_key else None
    paths = args.path
    if len(paths) == 1 and replica_dirs(paths) in ([], [Path(paths[0])]):  # one file or directory, not a fleet
        return _print_chains(verify_path(paths[0], public=public), public, args.max_unsigned)
    return _print_fleet(verify_fleet(paths, public=public), public, args.max_unsigned)


def _print_fleet(fleet: FleetReport, public, max_unsigned) -> int:
    status, failed = 0 if fleet.ok else 1, fleet.failed
    for rep in fleet.replicas:
        print(f"replica {rep.replica} ({rep.path}):")
        if _print_chains(rep.chains, public, max_unsigned, indent="  "):
            status = 1
            failed = sorted(set(failed) | {rep.replica})
        for problem in rep.problems:
            print(f"  PROBLEM {problem}")
        print(f"REPLICA {rep.replica:<12} {'FAILED' if rep.replica in failed else 'OK    '}  {rep.records} records "
              f"({rep.served} served), {rep.checkpoints} checkpoints, {len(rep.chains)} chains")
    for message, _ in fleet.problems:
        print(f"FLEET   {message}")
    served = sum(r.served for r in fleet.replicas)
    print(f"TOTAL   {len(fleet.replicas)} replicas, {fleet.records} records ({served} served)")
    if status:
        print(f"FAILED  {', '.join(failed) or 'the fleet'}")
    else:
        print("OK      every replica's chains verify, no replica is missing, nothing was served twice")
    return status


def _print_chains(result: dict[str, list[Report]], public, max_unsigned, indent: str = "") -> int:
    status = 0
    for chain, reports in result.items():
        for rep in reports:
            if rep.ok:
                tail = " (torn tail: a partial last line, from a crash mid-write)" if rep.torn_tail else ""
                print(f"{indent}OK      {rep.path}: {rep.records} records, head {rep.head[:16]}{tail}")
            else:
                status = 1
                where = f"line {rep.broken_at}: " if rep.broken_at else ""
                print(f"{indent}BROKEN  {rep.path}: {where}{rep.reason} ({rep.records} records verified before it)")
        last = reports[-1]
        if public is not None and last.ok:
            signed = sum(r.checkpoints for r in reports)
            print(f"{indent}        chain {chain}: {signed} valid signed checkpoints, "
                  f"{last.unsigned} records after the last")
            if max_unsigned is not None and last.unsigned > max_unsigned:
                status = 1
                print(f"{indent}UNSIGNED chain {chain}: {last.unsigned} records not covered by a signature "
                      f"(more than {max_unsigned})")
    return status


if __name__ == "__main__":
    sys.exit(main())
