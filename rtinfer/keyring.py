"""Keyring: AES-256 keys by key id, with rotation, loaded from a file only the service can read.

File format::

    {"keys": {"<key id>": {"key": "<base64 of 32 bytes>", "state": "active", "created": <unix s>,
                           "clients": ["<client id>", ...]},
              "<old id>": {"key": "...", "state": "retired", "retired_at": <unix s>, "grace_s": 86400}}}

``clients`` binds client ids to the key: an envelope's client id is only a claim of whoever holds
the key that sealed it, so a key may claim the ids it lists and no other (preprocess refuses the
rest as ``client_not_allowed``, audited). A key without ``clients`` (keyrings written before it
existed, ``init`` without ``--client``) may claim any valid id that no key lists: ids an operator
binds are exclusive to their keys at once, and an unbound key keeps working for ids nobody owns.
Only bound ids get a metric label of their own (``rtinfer.metrics``), so an unbound key cannot
take the label slots by claiming many ids. A client id is 1 to 64 of ``A-Z a-z 0-9 . _ : @ -``.

``active`` keys seal and open; a ``retired`` key only opens envelopes until
``retired_at + grace_s`` (so clients that sealed just before a rotation still get
served), then it is refused like an unknown key. ``KeyringSource`` reloads the file
when it changes, so rotation needs no server restart. Key material is never part of
a repr, a message or the CLI's output. ``python -m rtinfer.keyring`` creates, rotates,
retires, prunes, binds and lists keys (writes are atomic renames, mode 0600).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import json
import math
import os
import re
import stat
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from rtinfer.errors import NOT_AUTHENTICATED, Refusal
from rtinfer.reloading import ReloadingFile

ENV_VAR = "RTINFER_KEYRING"
DEFAULT_KEY_ID = "k1"
DEFAULT_GRACE_S = 24 * 3600
STATES = ("active", "retired")
CLIENT_ID = re.compile(r"[A-Za-z0-9._:@-]{1,64}")  # always fullmatch: '$' would let "alice\n" through


def valid_client_id(client_id) -> bool:
    """A client id safe in audit records, metric labels and messages."""
    return isinstance(client_id, str) and CLIENT_ID.fullmatch(client_id) is not None


class KeyringError(RuntimeError):
    """The keyring file is missing, malformed or too open; a deployment error, not a client's."""


@dataclass(frozen=True)
class Entry:
    key: bytes
    state: str = "active"
    created: float = 0.0
    retired_at: float | None = None
    grace_s: float = DEFAULT_GRACE_S
    clients: tuple[str, ...] | None = None  # client ids this key may claim; None: any id no key lists

    def __repr__(self) -> str:  # never show key material
        return (f"Entry(state={self.state!r}, created={self.created}, retired_at={self.retired_at}, "
                f"clients={self.clients})")

    def usable_until(self) -> float | None:
        """None: no end (active); else the unix time after which this key opens nothing."""
        return None if self.state == "active" else (self.retired_at or 0.0) + self.grace_s

    def to_json(self) -> dict:
        out = {"key": base64.b64encode(self.key).decode(), "state": self.state, "created": self.created}
        if self.state == "retired":
            out.update(retired_at=self.retired_at, grace_s=self.grace_s)
        if self.clients is not None:
            out["clients"] = list(self.clients)
        return out


class Keyring:
    def __init__(self, keys: dict[str, bytes | Entry]):
        self._entries = {k: v if isinstance(v, Entry) else Entry(v) for k, v in keys.items()}
        self._bound = {c for e in self._entries.values() for c in e.clients or ()}  # ids some key lists

    def __repr__(self) -> str:  # never show key material
        return f"Keyring(key_ids={self.key_ids})"

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> dict[str, Entry]:
        return dict(self._entries)

    def key(self, key_id: str, *, now: float | None = None) -> bytes:
        """The key that opens (and answers) envelopes sealed with ``key_id``: active, or retired within grace."""
        entry = self._entries.get(key_id)
        if entry is None:  # the client is not told whether a key id exists; the audit is
            raise Refusal("unknown_key", f"unknown key id '{key_id}'", public=NOT_AUTHENTICATED)
        until = entry.usable_until()
        if until is not None and (time.time() if now is None else now) > until:
            raise Refusal("retired_key", f"key id '{key_id}' was retired and its grace period has ended; "
                                  "seal with an active key", public=NOT_AUTHENTICATED)
        return entry.key

    def may_claim(self, key_id: str, client_id: str) -> bool:
        """Whether an envelope sealed with ``key_id`` may name ``client_id`` (see the module docstring)."""
        entry = self._entries.get(key_id)
        if entry is None or not valid_client_id(client_id):
            return False
        return client_id in entry.clients if entry.clients is not None else client_id not in self._bound

    def binds(self, key_id: str, client_id: str) -> bool:
        """Whether ``key_id`` lists ``client_id``: only then does the id count as the key holder's own."""
        entry = self._entries.get(key_id)
        return entry is not None and entry.clients is not None and client_id in entry.clients

    def check_client(self, key_id: str, client_id: str) -> None:
        """Refuse (``client_not_allowed``) a client id the key that sealed the envelope may not claim.
        The detail (audit) says why; the key holder is told only that the id is not theirs."""
        if self.may_claim(key_id, client_id):
            return
        shown = repr(client_id[:80]) if isinstance(client_id, str) else "?"
        if not valid_client_id(client_id):
            why = "is not a valid client id (1 to 64 of A-Z a-z 0-9 . _ : @ -)"
        elif self._entries.get(key_id) is not None and self._entries[key_id].clients is not None:
            why = f"is not one of the client ids bound to key id '{key_id}'"
        else:
            why = f"is bound to other keys; key id '{key_id}' (bound to no client id) may not claim it"
        raise Refusal("client_not_allowed", f"client id {shown} {why}",
                              public=f"client id {shown} may not be used with this key")

    def state_counts(self, *, now: float | None = None) -> dict[str, int]:
        """Keys by state: active, retired (still opening, in grace), expired (opens nothing)."""
        now = time.time() if now is None else now
        out = {"active": 0, "retired": 0, "expired": 0}
        for e in self._entries.values():
            until = e.usable_until()
            out["active" if until is None else "retired" if now <= until else "expired"] += 1
        return out

    def sealing_key_id(self, client_id: str | None = None) -> str:
        """The newest active key (that may claim ``client_id``, if given): what clients should seal with now."""
        active = [(e.created, k) for k, e in self._entries.items() if e.state == "active"
                  and (client_id is None or self.may_claim(k, client_id))]
        if not active:
            raise KeyringError("the keyring has no active key" + (f" for client id {client_id!r}" if client_id else ""))
        return max(active)[1]

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Keyring":
        return cls(_read(Path(path)))

    @classmethod
    def from_env_or(cls, path: str | None) -> "Keyring":
        return cls.load(resolve_path(path))


def resolve_path(path: str | None) -> Path:
    path = path or os.environ.get(ENV_VAR)
    if not path:
        raise KeyringError(f"no keyring: set the model parameter 'keyring' or ${ENV_VAR}")
    return Path(path)


def read_private(path: str | os.PathLike, what: str, error: type[Exception] = PermissionError) -> bytes:
    """The bytes of a key file that only its owner may read (keyring, server-internal key, signing key).

    The mode checked is that of the file read, not of a name that may be swapped in between."""
    with open(path, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        data = fh.read()
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise error(f"{what} {path} is readable by group/others (mode {stat.S_IMODE(mode):o}); chmod 600 it")
    return data


def _read(path: Path) -> dict[str, Entry]:
    try:
        raw = read_private(path, "keyring file", KeyringError)
    except FileNotFoundError:
        raise KeyringError(f"keyring file not found: {path}") from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise KeyringError(f"keyring file {path} is not valid JSON: {exc.__class__.__name__}") from None
    return parse(data, str(path))


def parse(data, where: str = "keyring") -> dict[str, Entry]:
    """The whole document checked before anything is used: a file of the wrong shape is refused as a whole."""
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, dict) or not keys:
        raise KeyringError(f"{where} must be an object {{\"keys\": {{<key id>: {{...}}}}}} with at least one key")
    entries = {}
    for key_id, item in keys.items():
        if not key_id or len(key_id) > 64 or not key_id.isprintable():
            raise KeyringError(f"{where} has a key id that is empty, too long or not printable")
        try:
            if not isinstance(item, dict) or not isinstance(item.get("key"), str):
                raise TypeError
            key = base64.b64decode(item["key"], validate=True)
            state = item.get("state", "active")
            retired_at = item.get("retired_at")
            entry = Entry(key, state, seconds(item.get("created", 0), "created"),
                          None if retired_at is None else seconds(retired_at, "retired_at"),
                          seconds(item.get("grace_s", DEFAULT_GRACE_S), "grace_s"),
                          client_ids(item["clients"]) if "clients" in item else None)
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            why = f": {exc}" if isinstance(exc, ValueError) and "must be" in str(exc) else ""
            raise KeyringError(f"key '{key_id}' in {where} is malformed (needs base64 'key', 'state'){why}") from None
        if len(key) != 32:
            raise KeyringError(f"key '{key_id}' in {where} is {len(key)} bytes, AES-256 needs 32")
        if state not in STATES:
            raise KeyringError(f"key '{key_id}' in {where} has state '{state}', expected one of {STATES}")
        if state == "retired" and retired_at is None:
            raise KeyringError(f"key '{key_id}' in {where} is retired but has no 'retired_at'")
        entries[key_id] = entry
    return entries


def client_ids(value) -> tuple[str, ...]:
    """A key's ``clients``: a list of valid client ids (a file that binds anything else is refused whole)."""
    if not isinstance(value, list) or not all(valid_client_id(c) for c in value):
        raise ValueError("clients must be a list of client ids (1 to 64 of A-Z a-z 0-9 . _ : @ -)")
    return tuple(sorted(set(value)))


def seconds(value, name: str = "time") -> float:
    """A time or duration in seconds: a finite, non-negative number (nan or inf would never expire)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} must be a number of seconds")
    try:
        out = float(value)
    except (ValueError, OverflowError):
        raise ValueError(f"{name} must be a number of seconds") from None
    if not math.isfinite(out) or out < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value!r}")
    return out


class KeyringSource:
    """The keyring of a file, reloaded when the file changes (checked at most every ``check_s``;
    ``rtinfer.reloading``).

    A reload that fails (bad JSON, too-open mode) keeps the last good keyring and
    reports the error through ``on_error`` once per change: a botched edit must not
    take the service down, nor widen what it accepts."""

    def __init__(self, path: str | os.PathLike, *, check_s: float = 1.0, on_error=None):
        self.path = Path(path)
        self.on_error = on_error or (lambda msg: print(f"rtinfer.keyring: {msg}", file=sys.stderr, flush=True))
        self._file = ReloadingFile(self.path, Keyring.load, check_s=check_s, on_error=self._failed)

    def _failed(self, exc: Exception) -> None:
        # a KeyringError says what is wrong; anything else only its type (its message may quote the file)
        why = exc if isinstance(exc, KeyringError) else type(exc).__name__
        self.on_error(f"keyring not reloaded, keeping the previous keys: {why}")

    @property
    def reloads(self) -> int:
        return self._file.reloads

    @property
    def reload_errors(self) -> int:
        return self._file.reload_errors

    def current(self) -> Keyring:
        return self._file.get()

    def __repr__(self) -> str:
        return f"KeyringSource({self.path}, {self._file.value!r})"


def save(path: str | os.PathLike, entries: dict[str, Entry]) -> Path:
    """Write atomically (temp file 0600 + rename), so a reloading server never reads half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"keys": {k: e.to_json() for k, e in sorted(entries.items())}}, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def new_entry(clients=None) -> Entry:
    return Entry(os.urandom(32), "active", time.time(), clients=None if clients is None else _clients(clients))


def write_new(path: str | os.PathLike, key_ids=(DEFAULT_KEY_ID,), clients: dict | None = None) -> Path:
    """Create a keyring with fresh random keys, readable by its owner only; ``clients``: key id -> the
    client ids it may claim (keys not in it are unbound, see the module docstring)."""
    clients = clients or {}
    return save(path, {k: new_entry(clients.get(k)) for k in key_ids})


def _clients(value) -> tuple[str, ...]:
    try:
        return client_ids(list(value))
    except ValueError as exc:
        raise KeyringError(str(exc)) from None


def next_key_id(entries: dict[str, Entry]) -> str:
    n = 1
    while f"k{n}" in entries:
        n += 1
    return f"k{n}"


def add_key(path, key_id: str | None = None, clients=None) -> str:
    entries = _read(Path(path))
    key_id = key_id or next_key_id(entries)
    if key_id in entries:
        raise KeyringError(f"key id '{key_id}' already exists in {path}")
    entries[key_id] = new_entry(clients)
    save(path, entries)
    return key_id


def bind(path, key_id: str, clients) -> tuple[str, ...]:
    """Let ``key_id`` claim ``clients`` too (binding an unbound key makes it claim only its list)."""
    entries = _read(Path(path))
    if key_id not in entries:
        raise KeyringError(f"no key id '{key_id}' in {path}")
    old = entries[key_id]
    entries[key_id] = replace(old, clients=_clients([*(old.clients or ()), *clients]))
    save(path, entries)
    return entries[key_id].clients


def retire_key(path, key_id: str, grace_s: float = DEFAULT_GRACE_S, *, now: float | None = None) -> None:
    grace_s = _grace(grace_s)
    entries = _read(Path(path))
    if key_id not in entries:
        raise KeyringError(f"no key id '{key_id}' in {path}")
    entries[key_id] = replace(entries[key_id], state="retired", retired_at=time.time() if now is None else now,
                              grace_s=grace_s)
    save(path, entries)


def rotate(path, grace_s: float = DEFAULT_GRACE_S, new_id: str | None = None,
           clients=None) -> tuple[str, list[str]]:
    """Add a new active key and retire every other active key with ``grace_s`` to drain. The new key claims
    ``clients``, else what the retired keys claimed (unbound if they all were)."""
    grace_s = _grace(grace_s)
    entries = _read(Path(path))
    new_id = new_id or next_key_id(entries)
    if new_id in entries:
        raise KeyringError(f"key id '{new_id}' already exists in {path}")
    now = time.time()
    retired = [k for k, e in entries.items() if e.state == "active"]
    if clients is None:
        bound = [entries[k].clients for k in retired]
        if any(c is None for c in bound) and any(c is not None for c in bound):
            raise KeyringError("the active keys are partly bound to client ids: name the new key's with --client")
        clients = None if not bound or bound[0] is None else [c for cs in bound for c in cs]
    for k in retired:
        entries[k] = replace(entries[k], state="retired", retired_at=now, grace_s=grace_s)
    entries[new_id] = new_entry(clients)
    save(path, entries)
    return new_id, retired


def _grace(value) -> float:
    try:
        return seconds(value, "grace_s")
    except ValueError as exc:
        raise KeyringError(str(exc)) from None


def _seconds_arg(text: str) -> float:
    """argparse type: refuses nan, inf and negative durations."""
    try:
        return seconds(text, "--grace-s")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def prune(path, *, now: float | None = None) -> list[str]:
    """Delete retired keys whose grace period is over (they open nothing any more)."""
    entries = _read(Path(path))
    now = time.time() if now is None else now
    gone = [k for k, e in entries.items() if e.usable_until() is not None and now > e.usable_until()]
    if gone and len(gone) == len(entries):
        raise KeyringError("pruning would leave the keyring empty; add a key first")
    for k in gone:
        del entries[k]
    if gone:
        save(path, entries)
    return gone


def describe(path) -> list[str]:
    """One line per key: id, state, dates, the client ids it may claim. No key material."""
    out = []
    now = time.time()
    for k, e in sorted(_read(Path(path)).items()):
        line = f"{k}\t{e.state}\tcreated {_iso(e.created)}"
        if e.state == "retired":
            until = e.usable_until()
            line += f"\tretired {_iso(e.retired_at)}\topens until {_iso(until)}" + (" (expired)" if now > until else "")
        out.append(line + "\tclients " + (",".join(e.clients) if e.clients is not None else "(any id no key claims)"))
    return out


def _iso(t: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t or 0))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rtinfer.keyring", description="create and rotate payload keys")
    sub = parser.add_subparsers(dest="cmd", required=True)
    init = sub.add_parser("init", help="create a keyring if it does not exist yet")
    init.add_argument("path")
    init.add_argument("--key-id", action="append", default=None)
    init.add_argument("--force", action="store_true", help="overwrite an existing keyring")
    client_help = "a client id the new key may claim (repeat; none: any id that no key claims)"
    init.add_argument("--client", action="append", default=None, help=client_help)
    add = sub.add_parser("add", help="add a new active key")
    add.add_argument("path")
    add.add_argument("--key-id")
    add.add_argument("--client", action="append", default=None, help=client_help)
    bnd = sub.add_parser("bind", help="let a key claim these client ids (a bound key claims only its list)")
    bnd.add_argument("path")
    bnd.add_argument("key_id")
    bnd.add_argument("clients", nargs="+")
    rot = sub.add_parser("rotate", help="add a new active key; retire the other active keys after a grace period")
    rot.add_argument("path")
    rot.add_argument("--key-id", help="id of the new key (default: next free kN)")
    rot.add_argument("--grace-s", type=_seconds_arg, default=DEFAULT_GRACE_S)
    rot.add_argument("--client", action="append", default=None,
                     help="a client id the new key may claim (repeat; default: the retired keys' ones)")
    ret = sub.add_parser("retire", help="make a key decrypt-only for a grace period (0 = refuse it now)")
    ret.add_argument("path")
    ret.add_argument("key_id")
    ret.add_argument("--grace-s", type=_seconds_arg, default=DEFAULT_GRACE_S)
    pr = sub.add_parser("prune", help="delete retired keys whose grace period is over")
    pr.add_argument("path")
    ls = sub.add_parser("list", help="key ids, states and dates (never key material)")
    ls.add_argument("path")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "init":
            if Path(args.path).exists() and not args.force:
                print(f"keyring exists: {args.path} ({Keyring.load(args.path)})")
                return 0
            key_ids = args.key_id or [DEFAULT_KEY_ID]
            write_new(args.path, key_ids, None if args.client is None else {k: args.client for k in key_ids})
            print(f"created keyring {args.path} ({Keyring.load(args.path)})")
        elif args.cmd == "add":
            print(f"added active key '{add_key(args.path, args.key_id, args.client)}' to {args.path}")
        elif args.cmd == "bind":
            print(f"key '{args.key_id}' may claim client ids {', '.join(bind(args.path, args.key_id, args.clients))}")
        elif args.cmd == "rotate":
            new_id, retired = rotate(args.path, args.grace_s, args.key_id, args.client)
            print(f"new active key '{new_id}'; retired {retired or 'none'} (grace {args.grace_s:.0f} s)")
        elif args.cmd == "retire":
            retire_key(args.path, args.key_id, args.grace_s)
            print(f"retired '{args.key_id}' (grace {args.grace_s:.0f} s)")
        elif args.cmd == "prune":
            print(f"pruned {prune(args.path) or 'nothing'}")
        elif args.cmd == "list":
            print("\n".join(describe(args.path)))
    except KeyringError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
