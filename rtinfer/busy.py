"""Which model instances of this server are computing right now: a hint, never a wait.

The classifier may run a lone request on all cores (``lone_request_thread_count``), but
only while nothing else in the server computes: under load the other cores belong to
the other instances and to preprocess, and a wide ONNX Runtime run then only contends
with them. Each instance holds an flock on its own file while it executes, in a
directory per server process (the stubs' parent); ``others_busy`` probes the other
files without blocking. Failures are ignored: the worst case is a wrong thread count.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
import time


class Marker:
    def __init__(self, instance: str, server_pid: int | None = None):
        self.dir = os.path.join(tempfile.gettempdir(), f"rtinfer-busy-{server_pid or os.getppid()}")
        self.path = os.path.join(self.dir, f"{instance}.lock")
        self.fd = None
        self._others: list[str] = []
        self._listed = 0.0
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            pass

    def __enter__(self) -> "Marker":
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            except OSError:
                pass
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            except OSError:
                pass

    def others_busy(self) -> bool:
        """True when another instance of this server holds its marker (is executing) right now."""
        if time.monotonic() - self._listed > 1.0:  # instances appear while models load: look again now and then
            try:
                self._others = [os.path.join(self.dir, f) for f in os.listdir(self.dir)
                                if f.endswith(".lock") and os.path.join(self.dir, f) != self.path]
            except OSError:
                self._others = []
            self._listed = time.monotonic()
        for path in self._others:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            except OSError:
                continue
            finally:
                os.close(fd)  # closing drops the probe's lock
        return False

    def close(self) -> None:
        """Remove this instance's file (and the directory once it is empty)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        for remove in (lambda: os.unlink(self.path), lambda: os.rmdir(self.dir)):
            try:
                remove()
            except OSError:
                pass
