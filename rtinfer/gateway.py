"""Launch the gateway (HAProxy with deploy/gateway/) in front of a Triton server on loopback.

Triton has no per-model authorization: whoever may infer can call every loaded model,
the composing steps included. The gateway is the only public listener; it exposes the
pipelines (``pipeline`` and ``cascade`` by default, ``--model``: inference, health, their metadata and
config, metrics) on HTTP and gRPC and
refuses everything else, checks the inference key and logs every request and refusal.
``python -m rtinfer.gateway`` starts Triton on internal loopback ports and the gateway on
the public ones, and serves until Ctrl-C (``make serve``).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from rtinfer import access
from rtinfer.server import ROOT, stop_process, Endpoints, TritonServer, _die_with_parent, free_port

CONFIG_DIR = ROOT / "deploy" / "gateway"
HAPROXY_ENV = "RTINFER_HAPROXY"
# One request at most: an 8 MiB envelope + framing (haproxy.cfg holds the same figure).
MAX_REQUEST_BYTES = 8 * 1024 * 1024 + 64 * 1024


class GatewayUnavailable(RuntimeError):
    """No usable HAProxy on this host."""


def haproxy_binary() -> str:
    """$RTINFER_HAPROXY, haproxy on PATH, or Debian's /usr/sbin/haproxy (sbin is not on every PATH)."""
    for candidate in (os.environ.get(HAPROXY_ENV), shutil.which("haproxy"), "/usr/sbin/haproxy",
                      "/usr/local/sbin/haproxy"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise GatewayUnavailable("HAProxy (2.6+, with Lua) is not installed: run `make haproxy` "
                             f"(apt-get install haproxy as root), or set ${HAPROXY_ENV}")


def key_digest(key: str) -> str:
    """What the gateway stores of an API key: HAProxy compares digest(sha256),hex (upper case)."""
    return hashlib.sha256(key.encode()).hexdigest().upper()


class Gateway(Endpoints):
    """A running HAProxy in front of Triton's HTTP, gRPC and metrics ports; a context manager."""

    def __init__(self, triton_http: str, triton_grpc: str, triton_metrics: str, *, host: str = "127.0.0.1",
                 http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0, model: str = "pipeline",
                 api_keys=(), tls_cert: str | None = None, tls_key: str | None = None,
                 tls_client_ca: str | None = None, rate_limit: int = 0,
                 workdir: str | os.PathLike = ROOT / "build" / "gateway", log_file: str | None = None):
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("gateway TLS needs both a certificate and its key")
        if tls_client_ca and not tls_cert:
            raise ValueError("mutual TLS needs the server certificate and key too")
        self.triton = {"HTTP": triton_http, "GRPC": triton_grpc, "METRICS": triton_metrics}
        self.host, self.model = host, model
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.api_key_digests = [key_digest(k) for k in api_keys if k]
        self.tls_cert, self.tls_key, self.tls_client_ca = tls_cert, tls_key, tls_client_ca
        self.rate_limit = int(rate_limit)
        self.workdir = Path(workdir) / f"gateway-{self.http_port}"
        self.log_file = Path(log_file) if log_file else self.workdir / "haproxy.log"
        self.proc: subprocess.Popen | None = None

    @classmethod
    def in_front_of(cls, server: TritonServer, **kwargs) -> "Gateway":
        return cls(server.http_url, server.grpc_url, f"{server.host}:{server.metrics_port}", **kwargs)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def _private(self, name: str, data: bytes) -> Path:
        path = self.workdir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path

    def environment(self) -> dict:
        """haproxy.cfg reads its settings from the environment (secrets stay in 0600 files)."""
        env = dict(os.environ)
        env.update(GW_DIR=str(CONFIG_DIR), GW_MODEL=self.model,
                   GW_HTTP_BIND=self.http_url, GW_GRPC_BIND=self.grpc_url,
                   GW_METRICS_BIND=f"{self.host}:{self.metrics_port}",
                   **{f"GW_TRITON_{name}": addr for name, addr in self.triton.items()})
        for unset in ("GW_TLS_PEM", "GW_TLS_CLIENT_CA", "GW_API_KEYS", "GW_RATE_LIMIT",
                      access.API_KEY_ENV, access.ADMIN_KEY_ENV):  # HAProxy needs no plaintext key
            env.pop(unset, None)
        if self.tls:  # HAProxy wants the certificate and its key in one file
            pem = Path(self.tls_cert).read_bytes().rstrip(b"\n") + b"\n" + Path(self.tls_key).read_bytes()
            env["GW_TLS_PEM"] = str(self._private("server.pem", pem))
        if self.tls_client_ca:
            env["GW_TLS_CLIENT_CA"] = str(Path(self.tls_client_ca).resolve())
        if self.api_key_digests:
            env["GW_API_KEYS"] = str(self._private("api-keys.sha256", "\n".join(self.api_key_digests).encode() + b"\n"))
        if self.rate_limit > 0:
            env["GW_RATE_LIMIT"] = str(self.rate_limit)
        return env

    def start(self, timeout: float = 15.0) -> "Gateway":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o700)
        env = self.environment()
        log = open(self.log_file, "ab")
        self.proc = subprocess.Popen([haproxy_binary(), "-db", "-f", str(CONFIG_DIR / "haproxy.cfg")],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            if all(self._listening(p) for p in (self.http_port, self.grpc_port, self.metrics_port)):
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"gateway not listening after {timeout:.0f}s:\n{self.log_text()[-4000:]}")

    def _listening(self, port: int) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=0.5):
                return True
        except OSError:
            return False

    def log_text(self) -> str:
        """The access log (one line per request, refusals with their reason) and HAProxy's messages."""
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.proc, signal.SIGTERM, timeout)

    def __enter__(self) -> "Gateway":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rtinfer.gateway", description=__doc__)
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--model", default="pipeline,cascade",
                   help="the models exposed, comma-separated (loaded with their steps and BLS targets)")
    p.add_argument("--host", default="127.0.0.1", help="address the gateway listens on (0.0.0.0: all)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--triton-http-port", type=int, default=0, help="Triton's loopback ports (0: free ports)")
    p.add_argument("--triton-grpc-port", type=int, default=0)
    p.add_argument("--triton-metrics-port", type=int, default=0)
    p.add_argument("--keyring")
    p.add_argument("--audit-dir")
    p.add_argument("--config-name", default="auto", help="'auto' = cpu when no GPU is present; '' = config.pbtxt")
    p.add_argument("--audit-signing-key", help="Ed25519 key (PEM, 0600) for signed audit checkpoints")
    p.add_argument("--api-key-file", help=f"inference needs this key (header {access.API_KEY_HEADER}), checked "
                   f"by the gateway and by Triton; or ${access.API_KEY_ENV}")
    p.add_argument("--admin-key-file", help="Triton's admin APIs (reachable on loopback only) need this key; "
                   f"or ${access.ADMIN_KEY_ENV}")
    p.add_argument("--tls-cert", help="gateway TLS on HTTP and gRPC: server certificate (PEM)")
    p.add_argument("--tls-key", help="gateway TLS: server private key (PEM)")
    p.add_argument("--tls-client-ca", help="gateway mutual TLS: CA that signs client certificates")
    p.add_argument("--rate-limit", type=int, default=0, help="requests per 10 s per client address (0: off)")
    args = p.parse_args(argv)
    api_key = access.read_secret(file=args.api_key_file, env=access.API_KEY_ENV)
    server = TritonServer(args.model_repository, models=args.model.split(","), host="127.0.0.1",
                          http_port=args.triton_http_port, grpc_port=args.triton_grpc_port,
                          metrics_port=args.triton_metrics_port, keyring=args.keyring, audit_dir=args.audit_dir,
                          config_name=args.config_name or None, audit_signing_key=args.audit_signing_key,
                          api_key=api_key, admin_key=access.read_secret(file=args.admin_key_file,
                                                                        env=access.ADMIN_KEY_ENV))
    gateway = Gateway.in_front_of(server, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                                  metrics_port=args.metrics_port, model=args.model, api_keys=[api_key],
                                  tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                                  rate_limit=args.rate_limit)
    haproxy_binary()  # fail before the server starts
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop both cleanly (Triton closes the audit)
    with server, gateway:
        print(f"gateway ready: HTTP {gateway.http_url}  gRPC {gateway.grpc_url}{' (TLS)' if gateway.tls else ''}"
              f"  metrics {gateway.metrics_url}  exposes '{args.model}' only"
              f"  inference key {'required' if api_key else 'OFF'}  access log {gateway.log_file}\n"
              f"tritonserver behind it on loopback: HTTP {server.http_url}  gRPC {server.grpc_url}"
              f"  metrics {server.metrics_url}  log {server.log_file}", flush=True)
        try:
            while server.proc.poll() is None and gateway.proc.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            return 0
    return 1  # one of them died


if __name__ == "__main__":
    sys.exit(main())
