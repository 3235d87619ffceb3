"""Replay protection: a freshness window on the sealed timestamp, and nonces seen within it.

An envelope is accepted once: its (key id, nonce) is recorded in a SQLite file
shared by every preprocess instance (each Triton instance is its own process and
Triton routes requests to instances arbitrarily, so per-instance memory would let
a replay through on another instance). Entries older than the window are pruned:
the window check already refuses those envelopes, so the store stays bounded by
window x request rate, and process memory by SQLite's page cache. The store is a
file, so a restart does not forget what was seen. It must be on a local file
system (SQLite's locking is unreliable on network file systems).
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

from rtinfer.errors import RejectedRequest

DEFAULT_WINDOW_S = 300.0
DEFAULT_FUTURE_SKEW_S = 30.0


class ReplayGuard:
    def __init__(self, path: str | os.PathLike, *, window_s: float = DEFAULT_WINDOW_S,
                 future_skew_s: float = DEFAULT_FUTURE_SKEW_S, prune_every_s: float = 5.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.window_ms = int(window_s * 1000)
        self.skew_ms = int(future_skew_s * 1000)
        self.prune_every_s = prune_every_s
        self._pruned = 0.0
        self._lock = threading.Lock()
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # survives a process crash; a power cut may lose the last commits
        self._db.execute("CREATE TABLE IF NOT EXISTS seen (id BLOB PRIMARY KEY, ts INTEGER NOT NULL) WITHOUT ROWID")
        self._db.execute("CREATE INDEX IF NOT EXISTS seen_ts ON seen (ts)")

    def check_window(self, timestamp_ms: int, *, now_ms: int | None = None) -> None:
        """Refuse an envelope sealed too long ago, or too far in the future (clock skew)."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        age = now_ms - timestamp_ms
        if age > self.window_ms:
            raise RejectedRequest("expired", f"envelope was sealed {age / 1000:.1f} s ago, outside the "
                                  f"{self.window_ms / 1000:.0f} s replay window; seal it again")
        if -age > self.skew_ms:
            raise RejectedRequest("from_future", f"envelope is sealed {-age / 1000:.1f} s in the future, more than "
                                  f"the allowed clock skew of {self.skew_ms / 1000:.0f} s")

    def record(self, items: list[tuple[str, bytes, int]], *, now_ms: int | None = None) -> list[bool]:
        """Record (key id, nonce, timestamp ms) of a batch in one transaction; False = seen before (a replay)."""
        if not items:
            return []
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        fresh = []
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                for key_id, nonce, ts in items:
                    cur.execute("INSERT OR IGNORE INTO seen (id, ts) VALUES (?, ?)",
                                (key_id.encode() + b"\0" + nonce, ts))
                    fresh.append(cur.rowcount == 1)
                if time.monotonic() - self._pruned > self.prune_every_s:
                    cur.execute("DELETE FROM seen WHERE ts < ?", (now_ms - self.window_ms,))
                    self._pruned = time.monotonic()
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return fresh

    def size(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM seen").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
