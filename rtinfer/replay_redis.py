"""Replay protection shared by a fleet: the nonce store on a Redis server (issue 21).

The SQLite store (``rtinfer.replay``) is one host's: behind a balancer, the same sealed
envelope sent to two replicas would be served twice. Every replica that names the same
Redis in its ``replay_store`` parameter records its nonces there instead. Same interface
as ``ReplayGuard`` (``admit``, ``record``, ``release``, ``check_window``), same refusals.

One command per nonce: ``SET rtinfer:<namespace>:<id> <token> NX GET PX <ttl>``, atomic on
the server: of two replicas admitting one nonce at the same moment, exactly one finds the
key absent. A batch goes out as one pipeline (one round trip, not a transaction: each SET
is atomic on its own and the verdicts are per item). ``ttl`` = window + future skew +
margin: an envelope passes the window check from ``sealed - skew`` to ``sealed + window``,
so a nonce admitted at the earliest is still held when the window check stops accepting
its envelope; the margin covers replicas' clocks that differ. Redis keeps an expiry as a
time on its own host's clock: a step forward of that clock by more than the margin would
forget nonces early (run it with NTP slewing, as the replicas).

``token`` is random per ``admit`` call and ``GET`` returns what the key held: nothing (admitted),
this call's own token (admitted: the connection broke after Redis had done it and the client
sent the pipeline again on a new one), anything else (``replayed``).

Fail closed: every connect and read has a short timeout (``timeout_ms``, 50 by default).
A timeout or any Redis error (refused connection, authentication, an ACL refusal, a
read-only replica) raises ``Unavailable``: the stage refuses the request UNAVAILABLE
(retryable) and audits it; nothing is served without Redis's answer. A broken connection
leaves the pool, so the next request connects again: serving resumes by itself when
Redis is back. Only a broken connection is retried, once and at once (the pooled
connection of a Redis that restarted); a timeout is never retried (the request would
wait twice as long).

After a failed ``admit`` some SETs may have been done (Redis ran them, the answer was lost):
those nonces stay recorded and that envelope is refused ``replayed`` if sent again, so a
client retries an UNAVAILABLE with a newly sealed envelope, as after any refusal. They are
never deleted blindly: another replica may own the key by then. ``release`` deletes only
nonces whose SET this stage saw succeed (the key is its own until it expires).

Credentials: the ACL user comes from the URL, its password from a file of mode 0600
(``password_file``), never from the URL or the model config. ``rediss://`` is TLS,
checked against ``ca_file`` (and the host name).
"""
from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from rtinfer.errors import Refusal, Unavailable
from rtinfer.keyring import read_private
from rtinfer.replay import (
    DEFAULT_FUTURE_SKEW_S,
    DEFAULT_PRUNE_MARGIN_S,
    DEFAULT_WINDOW_S,
    check_window,
    nonce_id,
    replayed,
)

PREFIX = "rtinfer:"  # the ACL user may touch only these keys (deploy/redis/)
DEFAULT_TIMEOUT_MS = 50.0
SCHEMES = ("redis", "rediss")


def is_redis_url(value: str) -> bool:
    return urlsplit(value).scheme in SCHEMES


class RedisReplayGuard:
    def __init__(self, url: str, *, namespace: str, password_file: str | os.PathLike | None = None,
                 ca_file: str | os.PathLike | None = None, timeout_ms: float = DEFAULT_TIMEOUT_MS,
                 window_s: float = DEFAULT_WINDOW_S, future_skew_s: float = DEFAULT_FUTURE_SKEW_S,
                 margin_s: float = DEFAULT_PRUNE_MARGIN_S, client: redis.Redis | None = None):
        """``namespace``: what the keys hold (``nonce``: envelopes, ``ctx``: audit contexts); ``client``:
        an already made client (unit tests: fakeredis)."""
        self.window_ms = int(window_s * 1000)
        self.skew_ms = int(future_skew_s * 1000)
        self.ttl_ms = self.window_ms + self.skew_ms + int(margin_s * 1000)
        self.prefix = f"{PREFIX}{namespace}:".encode()
        self.where, kwargs = client_options(url, password_file=password_file, ca_file=ca_file, timeout_ms=timeout_ms)
        self._redis = client if client is not None else redis.Redis(**kwargs)

    def check_window(self, timestamp_ms: int, *, now_ms: int | None = None) -> None:
        check_window(timestamp_ms, self.window_ms, self.skew_ms, now_ms)

    def key(self, key_id: str, nonce: bytes) -> bytes:
        return self.prefix + nonce_id(key_id, nonce).hex().encode()

    def admit(self, items: list[tuple[str, bytes, int]], *, now_ms: int | None = None,
              windowed: bool = True) -> list[Refusal | None]:
        """(key id, nonce, timestamp ms) of a batch -> None (fresh, now recorded) or why it is refused
        (expired, from the future, replayed). Raises ``Unavailable`` when Redis does not answer in time
        or answers with an error."""
        out: list[Refusal | None] = [None] * len(items)
        todo = []
        for i, (_, _, ts) in enumerate(items):
            try:
                if windowed:
                    self.check_window(ts, now_ms=now_ms)
                todo.append(i)
            except Refusal as exc:
                out[i] = exc
        if not todo:
            return out
        token = os.urandom(16)
        keys = [self.key(*items[i][:2]) for i in todo]
        answers = self._run(lambda pipe: [pipe.set(k, token, nx=True, get=True, px=self.ttl_ms) for k in keys])
        first: set[bytes] = set()
        for i, k, before in zip(todo, keys, answers):
            # A nonce twice in one batch: the second finds this call's own token, and is a replay all the same.
            out[i] = None if (before is None or before == token) and k not in first else replayed()
            first.add(k)
        return out

    def record(self, items: list[tuple[str, bytes, int]], *, now_ms: int | None = None) -> list[bool]:
        """Record nonces without the window check; False = seen before (a replay)."""
        return [r is None for r in self.admit(items, now_ms=now_ms, windowed=False)]

    def release(self, items: list[tuple[str, bytes]]) -> None:
        """Forget nonces of requests the server failed to answer (its own trouble), so they can be retried.
        Best effort: when Redis is failing too, the client seals a new envelope to retry."""
        if items:
            try:
                self._redis.delete(*[self.key(k, n) for k, n in items])
            except redis.RedisError:
                pass

    def check(self) -> str:
        """'' when Redis answers a PING as this user, else why not (logged at load; requests fail closed)."""
        try:
            self._run(lambda pipe: [pipe.ping()])
            return ""
        except Unavailable as exc:
            return str(exc)

    def size(self) -> None:
        """Not counted: that needs SCAN, which the ACL user may not run (Redis's own INFO counts the keys)."""
        return None

    def close(self) -> None:
        self._redis.close()

    def _run(self, queue) -> list:
        try:
            pipe = self._redis.pipeline(transaction=False)
            queue(pipe)
            return pipe.execute()
        except redis.RedisError as exc:
            raise Unavailable("replay_store_unavailable",
                              f"replay store {self.where}: {type(exc).__name__}: {exc}") from None


def client_options(url: str, *, password_file=None, ca_file=None, timeout_ms: float = DEFAULT_TIMEOUT_MS
                   ) -> tuple[str, dict]:
    """(the URL without secrets, for messages; ``redis.Redis`` keyword arguments) for
    ``redis[s]://[user@]host[:port][/db]``. Refused: a password in the URL, query options (they could
    turn certificate checks off), a CA file without TLS."""
    u = urlsplit(url)
    if u.scheme not in SCHEMES:
        raise ValueError(f"replay store {url!r}: not redis://[user@]host:port/db or rediss://... (or 'sqlite')")
    if u.password is not None:
        raise ValueError("replay store URL: the Redis password comes from replay_redis_password_file "
                         "(a 0600 file), never from the URL")
    if u.query or u.fragment or not u.hostname:
        raise ValueError(f"replay store URL {u.scheme}://{u.hostname or ''}...: give only "
                         "[user@]host[:port][/db]; TLS settings are parameters (replay_redis_ca)")
    db = u.path.strip("/") or "0"
    if not db.isdigit():
        raise ValueError(f"replay store URL: database {db!r} is not a number")
    user = unquote(u.username) if u.username else None
    port = u.port or 6379
    tls = u.scheme == "rediss"
    if ca_file and not tls:
        raise ValueError("replay_redis_ca is set but the replay store URL is not rediss:// (TLS)")
    password = None
    if password_file:
        password = read_private(password_file, "Redis password file").decode().rstrip("\r\n")
    timeout = timeout_ms / 1000
    kwargs = dict(host=u.hostname, port=port, db=int(db), username=user, password=password,
                  socket_timeout=timeout, socket_connect_timeout=timeout, socket_keepalive=True,
                  retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
                  driver_info=None)  # no CLIENT SETINFO: the ACL user may not run it
    if tls:
        kwargs.update(ssl=True, ssl_ca_certs=str(ca_file) if ca_file else None, ssl_cert_reqs="required",
                      ssl_check_hostname=True)
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"{u.scheme}://{user + '@' if user else ''}{host}:{port}/{db}", kwargs
