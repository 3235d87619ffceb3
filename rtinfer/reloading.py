"""A value read from a file, read again when the file changes: the keyring (``rtinfer.keyring.KeyringSource``)
and the server-internal key (``rtinfer.internal_key.InternalKeys``), rotated without a restart.

The file is looked at (``os.stat``: inode, mtime, size, mode) at most every ``check_s``; when it changed it is
loaded again. A reload that fails keeps the last good value and is reported once per change: a botched edit
must not take the service down, nor widen what it accepts. The first load must succeed.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


def stamp(path: Path) -> tuple | None:
    """What tells a changed file (an atomic rename gives a new inode; a chmod, a new mode), None if absent."""
    try:
        st = os.stat(path)
        return st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode
    except OSError:
        return None


class ReloadingFile(Generic[T]):
    """``load(path)``, again whenever the file has changed; ``on_error(exc)`` for a reload that failed."""

    def __init__(self, path: str | os.PathLike, load: Callable[[Path], T], *, check_s: float = 1.0,
                 on_error: Callable[[Exception], None] | None = None):
        self.path = Path(path)
        self.load = load
        self.check_s = check_s
        self.on_error = on_error or (lambda exc: None)
        self._lock = threading.Lock()
        self._stamp = stamp(self.path)  # before the load: a change during it is seen at the next look
        self._value = load(self.path)
        self._checked = time.monotonic()
        self.reloads = 0  # good reloads
        self.reload_errors = 0  # failed ones (the previous value kept)

    @property
    def value(self) -> T:
        """The value last loaded, without looking at the file."""
        return self._value

    def get(self, *, fresh: bool = False) -> T:
        """The value; the file is looked at when ``check_s`` has passed since the last look, or now if ``fresh``."""
        now = time.monotonic()
        if not fresh and now - self._checked < self.check_s:
            return self._value
        with self._lock:
            self._checked = now
            current = stamp(self.path)
            if current != self._stamp:
                self._stamp = current
                try:
                    self._value = self.load(self.path)
                    self.reloads += 1
                except Exception as exc:  # noqa: BLE001 - whatever the file holds, the previous value stays
                    self.reload_errors += 1
                    self.on_error(exc)
            return self._value
