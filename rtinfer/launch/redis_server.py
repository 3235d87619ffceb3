"""Launch a real ``redis-server`` for the fleet's shared replay store (tests, ``make serve REPLICAS=N``).

Harness only, as ``rtinfer.launch.server`` and ``rtinfer.launch.gateway`` (the stages import
``rtinfer.replay_redis``, never this). ``deploy/redis/redis.conf`` holds the settings that
matter (AOF ``everysec``, loopback, no eviction); this adds the port, the data directory,
TLS when asked, and the ACL: the ``default`` user off, one user (``rtinfer``) allowed only
``SET``/``DEL``/``PING`` (and ``SELECT``) on keys ``rtinfer:*``, its password in a 0600 file
(the ACL file holds only its SHA-256). Everything lives in one directory, so ``stop()`` or
``kill()`` and ``start()`` again is a restart of the same Redis (its AOF) on the same port.

``python -m rtinfer.launch.redis_server --dir build/redis`` serves until Ctrl-C.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rtinfer import access
from rtinfer.launch.process import die_with_parent, free_port, stop_process
from rtinfer.launch.server import ROOT

CONF = ROOT / "deploy" / "redis" / "redis.conf"
USER = "rtinfer"
# What the stages run (rtinfer.replay_redis): SET ... NX GET PX, DEL, PING; SELECT for a database other than 0.
ACL_RULES = "~rtinfer:* resetchannels -@all +set +del +ping +select"


class RedisUnavailable(RuntimeError):
    pass


def redis_binary() -> str:
    for c in (os.environ.get("RTINFER_REDIS_SERVER"), shutil.which("redis-server"), "/usr/bin/redis-server"):
        if c and os.access(c, os.X_OK):
            return c
    raise RedisUnavailable("redis-server is not installed: run `make redis` (deploy/redis/require-redis.sh), "
                           "or set RTINFER_REDIS_SERVER=/path/to/redis-server")


class RedisServer:
    """A running redis-server on loopback; a context manager that always stops it.

    ``url`` (``redis://rtinfer@127.0.0.1:PORT/0``, ``rediss://`` with ``tls=True``), ``password_file``,
    ``ca_file`` (TLS only) are what a stage needs: ``params`` as model parameters, ``env`` as the
    server's environment (``RTINFER_REPLAY_STORE``, ...; stage parameters left empty read these)."""

    def __init__(self, workdir: str | os.PathLike | None = None, *, port: int = 0, host: str = "127.0.0.1",
                 tls: bool = False, appendfsync: str = "", user: str = USER):
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="rtinfer-redis-") if workdir is None else workdir).resolve()
        self.host, self.port, self.tls, self.user = host, port or free_port(), tls, user
        self.appendfsync = appendfsync  # '' = deploy/redis/redis.conf's (everysec)
        self.password_file = self.workdir / "redis-password"
        self.ca_file: Path | None = self.workdir / "tls" / "ca.pem" if tls else None
        self.log_file = self.workdir / "redis.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{self.user}@{self.host}:{self.port}/0"

    @property
    def params(self) -> dict[str, str]:
        """Stage parameters (preprocess, postprocess, cascade) that use this Redis."""
        out = {"replay_store": self.url, "replay_redis_password_file": str(self.password_file)}
        if self.ca_file:
            out["replay_redis_ca"] = str(self.ca_file)
        return out

    @property
    def env(self) -> dict[str, str]:
        """The same as environment variables, for servers whose stage parameters are left empty."""
        out = {"RTINFER_REPLAY_STORE": self.url, "RTINFER_REDIS_PASSWORD_FILE": str(self.password_file)}
        if self.ca_file:
            out["RTINFER_REDIS_CA"] = str(self.ca_file)
        return out

    def _configure(self) -> Path:
        """Config, ACL, password (and TLS certificates) once; a restart reuses them (and the AOF)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)
        if not self.password_file.exists():
            access.write_private(self.password_file, secrets.token_urlsafe(32).encode())
        password = self.password_file.read_bytes().decode().rstrip("\r\n")
        acl = self.workdir / "users.acl"
        access.write_private(acl, (f"user default off resetchannels -@all\n"
                                   f"user {self.user} on #{hashlib.sha256(password.encode()).hexdigest()} "
                                   f"{ACL_RULES}\n").encode())
        lines = [f"include {CONF}", f"bind {self.host}", f"dir {self.workdir}", f"aclfile {acl}",
                 f"logfile {self.log_file}"]
        if self.appendfsync:
            lines.append(f"appendfsync {self.appendfsync}")
        if self.tls:
            certs = self.workdir / "tls"
            if not (certs / "server.pem").exists():
                access.loopback_certs(certs)
            lines += ["port 0", f"tls-port {self.port}", f"tls-cert-file {certs / 'server.pem'}",
                      f"tls-key-file {certs / 'server-key.pem'}", f"tls-ca-cert-file {certs / 'ca.pem'}",
                      "tls-auth-clients no"]
        else:
            lines.append(f"port {self.port}")
        conf = self.workdir / "redis.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def client(self, **kwargs):
        """A client logged in as the stages' user (tests)."""
        import redis

        from rtinfer.replay_redis import client_options
        _, options = client_options(self.url, password_file=self.password_file, ca_file=self.ca_file,
                                    timeout_ms=kwargs.pop("timeout_ms", 1000))
        return redis.Redis(**{**options, **kwargs})

    def start(self, timeout: float = 20.0) -> "RedisServer":
        conf = self._configure()
        log = open(self.workdir / "redis.stdout", "ab")
        self.proc = subprocess.Popen([redis_binary(), str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir, start_new_session=True, preexec_fn=die_with_parent)
        log.close()
        deadline = time.monotonic() + timeout
        client = self.client()
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RedisUnavailable(f"redis-server exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if client.ping():
                        return self
                except Exception:  # noqa: BLE001 - not listening yet, or loading its AOF
                    time.sleep(0.05)
        finally:
            client.close()
        self.kill()
        raise TimeoutError(f"redis-server not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: Redis writes and fsyncs its AOF, then exits."""
        stop_process(self.proc, signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash (what the AOF's fsync policy is for)."""
        if self.running():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: Redis accepts connections (the kernel does) but answers nothing: the timeout path."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.running():
            self.resume()  # a paused Redis cannot handle SIGTERM
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rtinfer.launch.redis_server", description=__doc__)
    p.add_argument("--dir", default=str(ROOT / "build" / "redis"), help="data, config, ACL and password file")
    p.add_argument("--port", type=int, default=6379)
    p.add_argument("--tls", action="store_true", help="TLS only (loopback certificates made in DIR/tls)")
    args = p.parse_args(argv)
    server = RedisServer(args.dir, port=args.port, tls=args.tls).start()
    print(f"redis-server ready: {server.url}  password file {server.password_file}"
          f"{f'  CA {server.ca_file}' if server.ca_file else ''}  log {server.log_file}", flush=True)
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
