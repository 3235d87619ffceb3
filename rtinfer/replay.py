"""Replay protection: a freshness window on the sealed timestamp, and nonces seen within it.

An envelope is accepted once: its (key id, nonce) is recorded in a SQLite file
shared by every preprocess instance (each Triton instance is its own process and
Triton routes requests to instances arbitrarily, so per-instance memory would let
a replay through on another instance). Entries older than the window are pruned:
the window check already refuses those envelopes, so the store stays bounded by
(window + margin) x request rate, and process memory by SQLite's page cache. The
store is a file, so a restart does not forget what was seen. It must be on a local
file system (SQLite's locking is unreliable on network file systems).

Pruning never follows a clock that ran ahead (issue 20): its reference is the
server's own wall clock as the monotonic clock carried it from the earliest reading
this process took (a step forward, then back, cannot advance it; never a client's
timestamp), less the window and ``prune_margin_s``. A wall clock that is stepped
forward for real keeps entries longer, by the step, until the stage restarts: more
disk, never a replay let through.

The window check and the nonce insert happen in one write transaction, against one
clock reading taken inside it: another instance cannot prune a nonce between the
check and the insert. When the store is locked or failing (another process holding
a write lock, a backup tool, a full disk), ``admit`` gives up after ``busy_timeout_s``
and raises ``Unavailable``: the requests are refused as retryable, not stalled.

This store is one host's. A fleet behind a balancer shares one Redis instead
(``rtinfer.replay_redis``, chosen by the stage parameter ``replay_store``): the same
interface, the same window check and refusals.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

from rtinfer.errors import Refusal, Unavailable

DEFAULT_WINDOW_S = 300.0
DEFAULT_FUTURE_SKEW_S = 30.0
DEFAULT_BUSY_TIMEOUT_S = 0.25
DEFAULT_PRUNE_MARGIN_S = 60.0  # kept past the window: instances' readings differ, NTP steps the clock


class ReplayGuard:
    def __init__(self, path: str | os.PathLike, *, window_s: float = DEFAULT_WINDOW_S,
                 future_skew_s: float = DEFAULT_FUTURE_SKEW_S, prune_every_s: float = 5.0,
                 busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S, prune_margin_s: float = DEFAULT_PRUNE_MARGIN_S):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.window_ms = int(window_s * 1000)
        self.skew_ms = int(future_skew_s * 1000)
        self.prune_every_s = prune_every_s
        self.margin_ms = int(prune_margin_s * 1000)
        self._pruned = 0.0
        self._wall_minus_mono: int | None = None  # the smallest (wall - monotonic) seen: see prune_before
        self._lock = threading.Lock()
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        # Setting up may wait for other instances starting at the same time; requests may not wait long.
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # survives a process crash; a power cut may lose the last commits
        self._db.execute("CREATE TABLE IF NOT EXISTS seen (id BLOB PRIMARY KEY, ts INTEGER NOT NULL) WITHOUT ROWID")
        self._db.execute("CREATE INDEX IF NOT EXISTS seen_ts ON seen (ts)")
        self._db.execute(f"PRAGMA busy_timeout = {max(0, int(busy_timeout_s * 1000))}")

    def check_window(self, timestamp_ms: int, *, now_ms: int | None = None) -> None:
        """Refuse an envelope sealed too long ago, or too far in the future (clock skew)."""
        check_window(timestamp_ms, self.window_ms, self.skew_ms, now_ms)

    def admit(self, items: list[tuple[str, bytes, int]], *, now_ms: int | None = None,
              windowed: bool = True) -> list[Refusal | None]:
        """(key id, nonce, timestamp ms) of a batch -> None (fresh, now recorded) or why it is refused
        (expired, from the future, replayed), all in one transaction with one clock reading.
        Raises ``Unavailable`` when the store is locked or failing (nothing recorded then)."""
        if not items:
            return []
        out: list[Refusal | None] = []
        with self._lock:
            try:
                cur = self._db.cursor()
                cur.execute("BEGIN IMMEDIATE")
                try:
                    now = int(time.time() * 1000) if now_ms is None else now_ms  # read under the write lock
                    for key_id, nonce, ts in items:
                        try:
                            if windowed:
                                self.check_window(ts, now_ms=now)
                        except Refusal as exc:
                            out.append(exc)
                            continue
                        cur.execute("INSERT OR IGNORE INTO seen (id, ts) VALUES (?, ?)", (nonce_id(key_id, nonce), ts))
                        out.append(None if cur.rowcount == 1 else replayed())
                    cutoff = self.prune_before(now)
                    if time.monotonic() - self._pruned > self.prune_every_s:
                        cur.execute("DELETE FROM seen WHERE ts < ?", (cutoff,))
                        self._pruned = time.monotonic()
                    cur.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise Unavailable("replay_store_unavailable", f"replay store {self.path.name}: "
                                  f"{type(exc).__name__}: {exc}") from None
        return out

    def prune_before(self, wall_ms: int) -> int:
        """The timestamp below which entries may go, given this wall clock reading. The reference is the
        wall clock carried forward by the monotonic clock from the earliest point seen, so a wall clock
        that jumps ahead (and is set back) cannot make the store forget a nonce the window check would
        still accept once the clock is right again."""
        mono_ms = time.monotonic_ns() // 1_000_000
        offset = wall_ms - mono_ms
        if self._wall_minus_mono is None or offset < self._wall_minus_mono:
            self._wall_minus_mono = offset
        return mono_ms + self._wall_minus_mono - self.window_ms - self.margin_ms

    def record(self, items: list[tuple[str, bytes, int]], *, now_ms: int | None = None) -> list[bool]:
        """Record nonces without the window check; False = seen before (a replay)."""
        return [r is None for r in self.admit(items, now_ms=now_ms, windowed=False)]

    def release(self, items: list[tuple[str, bytes]]) -> None:
        """Forget nonces of requests the server failed to answer (its own trouble), so they can be retried."""
        if not items:
            return
        with self._lock:
            try:
                with self._db:
                    self._db.executemany("DELETE FROM seen WHERE id = ?", [(nonce_id(k, n),) for k, n in items])
            except sqlite3.Error:
                pass  # the store is failing: the client seals a new envelope to retry

    def size(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM seen").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def check_window(timestamp_ms: int, window_ms: int, skew_ms: int, now_ms: int | None = None) -> None:
    """Refuse an envelope sealed more than ``window_ms`` ago or more than ``skew_ms`` ahead (clock skew)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    age = now_ms - timestamp_ms
    if age > window_ms:
        raise Refusal("expired", f"envelope was sealed {age / 1000:.1f} s ago, outside the "
                              f"{window_ms / 1000:.0f} s replay window; seal it again")
    if -age > skew_ms:
        raise Refusal("from_future", f"envelope is sealed {-age / 1000:.1f} s in the future, more than "
                              f"the allowed clock skew of {skew_ms / 1000:.0f} s")


def replayed() -> Refusal:
    return Refusal("replayed", "envelope was already received (replay): its nonce was seen within the "
                           "replay window")


def nonce_id(key_id: str, nonce: bytes) -> bytes:
    """The stored id of a (key id, nonce) pair (SQLite here, Redis in rtinfer.replay_redis)."""
    return key_id.encode() + b"\0" + nonce
