"""Launch the gateway (HAProxy with deploy/gateway/) in front of Triton servers (replicas) on loopback.

Triton has no per-model authorization: whoever may infer can call every loaded model,
the composing steps included. The gateway is the only public listener; it exposes the
pipelines (``pipeline`` and ``cascade`` by default, ``--model``: inference, health, their metadata and
config, metrics) on HTTP and gRPC and
refuses everything else, checks the inference key and logs every request and refusal.
``python -m rtinfer.launch.gateway`` starts Triton on internal loopback ports and the gateway on
the public ones, and serves until Ctrl-C (``make serve``); ``--replicas N`` starts N Triton
replicas sharing one Redis replay store (rtinfer.launch.fleet), balanced per request.

With several replicas, each is one server (named by its replica id) in each backend; HAProxy's
runtime API (a 0600 Unix socket in the gateway's work directory) drains, re-enables or puts a
replica in maintenance (``Gateway.set_replica_state``), for rolling restarts.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rtinfer import access
from rtinfer.launch import model_docs
from rtinfer.launch.process import die_with_parent, free_port, stop_process
from rtinfer.launch.server import ROOT, Endpoints, TritonServer

CONFIG_DIR = ROOT / "deploy" / "gateway"
HAPROXY_ENV = "RTINFER_HAPROXY"
# One request at most: an 8 MiB envelope + framing (haproxy.cfg holds the same figure).
MAX_REQUEST_BYTES = 8 * 1024 * 1024 + 64 * 1024
# A replica id names HAProxy servers and backends (replica_<id>) and a URL path segment.
REPLICA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
REPLICA_BACKENDS = ("triton_http", "triton_grpc")  # the gRPC server tracks the HTTP one (haproxy.cfg)


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


@dataclass(frozen=True)
class Replica:
    """One Triton behind the gateway: its id (the HAProxy server name) and loopback addresses (host:port)."""
    id: str
    http: str
    grpc: str
    metrics: str

    def __post_init__(self):
        if not REPLICA_ID.fullmatch(self.id):
            raise ValueError(f"replica id {self.id!r}: 1-63 of [A-Za-z0-9_.-], starting with a letter or digit")

    @classmethod
    def of(cls, server: TritonServer, replica_id: str | None = None) -> "Replica":
        return cls(replica_id or getattr(server, "replica_id", None) or "triton", server.http_url, server.grpc_url,
                   f"{server.host}:{server.metrics_port}")


def replicas_config(replicas: list[Replica]) -> str:
    """The backends of haproxy.cfg for these replicas (its "defaults replicas" section holds the policy):
    every replica is a server in triton_http (health-checked) and triton_grpc (tracking it); /metrics
    goes to the first replica, /replicas/<id>/metrics to each."""
    lines = ["# written by rtinfer/launch/gateway.py: the replicas behind deploy/gateway/haproxy.cfg", "",
             "backend triton_http from replicas"]
    lines += [f"    server {r.id} {r.http} check" for r in replicas]
    lines += ["", "backend triton_grpc from replicas"]
    lines += [f"    server {r.id} {r.grpc} proto h2 track triton_http/{r.id}" for r in replicas]
    lines += ["", "backend triton_metrics from replicas", f"    server {replicas[0].id} {replicas[0].metrics}"]
    for r in replicas:
        lines += ["", f"backend replica_{r.id} from replicas", f"    server {r.id} {r.metrics}"]
    return "\n".join(lines) + "\n"


class Gateway(Endpoints):
    """A running HAProxy in front of the HTTP, gRPC and metrics ports of one Triton or several replicas;
    a context manager. ``replicas`` (``Replica``) replaces the three addresses of a single server."""

    def __init__(self, triton_http: str | None = None, triton_grpc: str | None = None,
                 triton_metrics: str | None = None, *, replicas=None, host: str = "127.0.0.1",
                 http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0, model: str = "pipeline",
                 api_keys=(), tls_cert: str | None = None, tls_key: str | None = None,
                 tls_client_ca: str | None = None, rate_limit: int = 0,
                 workdir: str | os.PathLike = ROOT / "build" / "gateway", log_file: str | None = None,
                 docs: bool = True):
        """``docs``: take the stripped config/metadata snapshot at start (rtinfer.launch.model_docs) and answer
        HTTP config and metadata reads from it, the exposed models' ensemble steps' included; False: those
        reads of the exposed models go to Triton and no other model's are answered (as without a snapshot)."""
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("gateway TLS needs both a certificate and its key")
        if tls_client_ca and not tls_cert:
            raise ValueError("mutual TLS needs the server certificate and key too")
        if replicas is None:
            if not (triton_http and triton_grpc and triton_metrics):
                raise ValueError("the gateway needs Triton's three addresses, or replicas")
            replicas = [Replica("triton", triton_http, triton_grpc, triton_metrics)]
        self.replicas = list(replicas)
        if not self.replicas or len({r.id for r in self.replicas}) != len(self.replicas):
            raise ValueError("the gateway needs at least one replica, each with its own id")
        self.host, self.model = host, model
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.api_key_digests = [key_digest(k) for k in api_keys if k]
        self.tls_cert, self.tls_key, self.tls_client_ca = tls_cert, tls_key, tls_client_ca
        self.rate_limit = int(rate_limit)
        self.workdir = Path(workdir) / f"gateway-{self.http_port}"
        self.log_file = Path(log_file) if log_file else self.workdir / "haproxy.log"
        self.stats_socket = self.workdir.absolute() / "admin.sock"  # haproxy reads a relative one as host:port
        self.docs_file = self.workdir / "model-docs.tsv" if docs else None
        self.proc: subprocess.Popen | None = None

    @classmethod
    def in_front_of(cls, server: TritonServer, **kwargs) -> "Gateway":
        return cls(replicas=[Replica.of(server)], **kwargs)

    @classmethod
    def in_front_of_fleet(cls, servers, **kwargs) -> "Gateway":
        """One gateway for several replicas (TritonServer with ``replica_id``), balanced per request."""
        return cls(replicas=[Replica.of(s) for s in servers], **kwargs)

    @property
    def replica_ids(self) -> list[str]:
        return [r.id for r in self.replicas]

    def replica_metrics_url(self, replica_id: str) -> str:
        return f"http://{self.host}:{self.metrics_port}/replicas/{replica_id}/metrics"

    def scrape_config(self) -> str:
        """Prometheus scrape_configs for this gateway (written beside its log as prometheus-scrape.yml):
        HAProxy's exporter (per replica: servers named by replica id), the gateway's gRPC answers per
        replica, and each replica's Triton metrics through /replicas/<id>/metrics with ``instance`` and
        ``replica`` set to the replica id (one address, so the label tells the series apart)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        target = f'["{host}:{self.metrics_port}"]'
        lines = ["scrape_configs:",
                 "  - job_name: gateway", "    metrics_path: /gateway/metrics",
                 f"    static_configs: [{{targets: {target}}}]",
                 "  - job_name: gateway_replicas", "    metrics_path: /gateway/replicas/metrics",
                 f"    static_configs: [{{targets: {target}}}]",
                 "  - job_name: triton", "    static_configs:"]
        for r in self.replicas:
            lines.append(f"      - {{targets: {target}, labels: {{replica: {r.id}, "
                         f"__metrics_path__: /replicas/{r.id}/metrics}}}}")
        lines += ["    relabel_configs:", "      - {source_labels: [replica], target_label: instance}"]
        return "\n".join(lines) + "\n"

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def _private(self, name: str, data: bytes) -> Path:
        """0600 from the first byte, also when the file is left from an earlier run on this port with a wider
        mode (O_CREAT's mode applies to new files only): access.write_private narrows it before writing."""
        path = self.workdir / name
        access.write_private(path, data)
        return path

    def environment(self) -> dict:
        """haproxy.cfg reads its settings from the environment (secrets stay in 0600 files)."""
        env = dict(os.environ)
        env.update(GW_DIR=str(CONFIG_DIR), GW_MODEL=self.model,
                   GW_HTTP_BIND=self.http_url, GW_GRPC_BIND=self.grpc_url,
                   GW_METRICS_BIND=f"{self.host}:{self.metrics_port}", GW_STATS_SOCKET=str(self.stats_socket))
        for unset in ("GW_TLS_PEM", "GW_TLS_CLIENT_CA", "GW_API_KEYS", "GW_RATE_LIMIT", "GW_MODEL_DOCS",
                      access.API_KEY_ENV, access.ADMIN_KEY_ENV):  # HAProxy needs no plaintext key
            env.pop(unset, None)
        if self.docs_file is not None:
            env["GW_MODEL_DOCS"] = str(self.docs_file.absolute())
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

    def command(self) -> list[str]:
        """haproxy with deploy/gateway/haproxy.cfg and the replicas' backends written beside the log."""
        backends = self.workdir / "replicas.cfg"
        backends.write_text(replicas_config(self.replicas))
        (self.workdir / "prometheus-scrape.yml").write_text(self.scrape_config())
        return [haproxy_binary(), "-db", "-f", str(CONFIG_DIR / "haproxy.cfg"), "-f", str(backends)]

    def start(self, timeout: float = 15.0) -> "Gateway":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o700)
        if len(str(self.stats_socket)) > 100:  # a Unix socket path has at most 107 bytes
            self.stats_socket = Path(tempfile.mkdtemp(prefix="rtinfer-gw-")) / "admin.sock"
        if self.docs_file is not None:  # from the first replica, over loopback (one model repository for all)
            model_docs.write(model_docs.snapshot(self.replicas[0].http, self.model.split(",")), self.docs_file)
        env = self.environment()
        log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(self.command(),
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True, preexec_fn=die_with_parent)
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

    # ------------------------------------------------------------ HAProxy's runtime API (rolling restarts)

    def runtime(self, command: str, timeout: float = 5.0) -> str:
        """One command on HAProxy's runtime API (stats socket, level admin); its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.stats_socket))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def _replica(self, replica_id: str) -> str:
        if replica_id not in self.replica_ids:
            raise KeyError(f"no replica {replica_id!r} behind this gateway ({', '.join(self.replica_ids)})")
        return replica_id

    def set_replica_state(self, replica_id: str, state: str) -> None:
        """ready | drain (no new requests, those in flight finish, still health-checked) | maint (no
        traffic, no checks). Set on triton_http/<id>; triton_grpc/<id> tracks it."""
        if state not in ("ready", "drain", "maint"):
            raise ValueError(f"state must be ready, drain or maint, not {state!r}")
        answer = self.runtime(f"set server triton_http/{self._replica(replica_id)} state {state}").strip()
        if answer:
            raise RuntimeError(f"haproxy refused 'set server triton_http/{replica_id} state {state}': {answer}")

    def server_stats(self) -> dict[tuple[str, str], dict]:
        """(backend, server) -> HAProxy's statistics row (``show stat``: status, scur, stot, hrsp_5xx, ...)."""
        text = self.runtime("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {(r["pxname"], r["svname"]): r for r in rows if r["svname"] not in ("FRONTEND", "BACKEND")}

    def replica_status(self, replica_id: str) -> str:
        """HAProxy's view of a replica: UP, DOWN, DRAIN, MAINT, or a transition ("UP 1/2": going down)."""
        return self.server_stats()[("triton_http", self._replica(replica_id))]["status"]

    def in_flight(self, replica_id: str) -> int:
        """Requests the gateway has on this replica now (HTTP and gRPC)."""
        stats = self.server_stats()
        return sum(int(stats[(b, self._replica(replica_id))]["scur"] or 0) for b in REPLICA_BACKENDS)

    def wait_replica(self, replica_id: str, status: str, timeout: float = 30.0) -> float:
        """Wait until HAProxy shows the replica's status (UP, DOWN, ...); the seconds it took."""
        start = time.monotonic()
        while (seen := self.replica_status(replica_id)) != status:
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"replica {replica_id} is {seen!r}, not {status!r}, after {timeout:.0f}s")
            time.sleep(0.05)
        return time.monotonic() - start

    def drain(self, replica_id: str, timeout: float = 120.0) -> None:
        """No new requests to this replica; return once none is in flight on it."""
        self.set_replica_state(replica_id, "drain")
        deadline = time.monotonic() + timeout
        while self.in_flight(replica_id):
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica {replica_id} still has requests in flight after {timeout:.0f}s")
            time.sleep(0.05)

    def __enter__(self) -> "Gateway":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> int:
    from rtinfer.launch.fleet import Fleet  # fleet imports this module
    p = argparse.ArgumentParser(prog="python -m rtinfer.launch.gateway", description=__doc__)
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--model", default="pipeline,cascade",
                   help="the models exposed, comma-separated (loaded with their steps and BLS targets)")
    p.add_argument("--replicas", type=int, default=1,
                   help="Triton replicas behind the gateway (>1: ids r1..rN, audit directories <audit-dir>/<id>, "
                   "one Redis replay store shared by all; SIGHUP restarts them one by one, drained first)")
    p.add_argument("--host", default="127.0.0.1", help="address the gateway listens on (0.0.0.0: all)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--triton-http-port", type=int, default=0, help="Triton's loopback ports (0: free ports); "
                   "replica i (from 0) uses these + 10 i")
    p.add_argument("--triton-grpc-port", type=int, default=0)
    p.add_argument("--triton-metrics-port", type=int, default=0)
    p.add_argument("--keyring")
    p.add_argument("--audit-dir", help="the audit directory (with --replicas > 1: the fleet's root)")
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
    haproxy_binary()  # fail before the servers start
    fleet = Fleet(args.replicas, audit_root=args.audit_dir or ROOT / "build" / "audit", keyring=args.keyring,
                  audit_signing_key=args.audit_signing_key, models=args.model.split(","),
                  model_repository=args.model_repository, config_name=args.config_name or None,
                  api_key=api_key, admin_key=access.read_secret(file=args.admin_key_file, env=access.ADMIN_KEY_ENV),
                  triton_http_port=args.triton_http_port, triton_grpc_port=args.triton_grpc_port,
                  triton_metrics_port=args.triton_metrics_port, workdir=ROOT / "build",
                  host=args.host, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                  model=args.model, tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                  rate_limit=args.rate_limit)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop them all cleanly (Triton closes the audit)
    hup = []
    signal.signal(signal.SIGHUP, lambda *_: hup.append(1))
    with fleet:
        gateway = fleet.gateway
        print(f"gateway ready: HTTP {gateway.http_url}  gRPC {gateway.grpc_url}{' (TLS)' if gateway.tls else ''}"
              f"  metrics {gateway.metrics_url}  exposes '{args.model}' only"
              f"  inference key {'required' if api_key else 'OFF'}  access log {gateway.log_file}", flush=True)
        for server in fleet.servers:
            name = f"replica {server.replica_id}" if server.replica_id else "tritonserver"
            print(f"{name} behind it on loopback: HTTP {server.http_url}  gRPC {server.grpc_url}"
                  f"  metrics {server.metrics_url}  log {server.log_file}", flush=True)
        if fleet.n > 1:
            print(f"fleet: {fleet.n} replicas, replay store {fleet.redis_url}; per-replica metrics "
                  f"{gateway.replica_metrics_url('<id>')} (Prometheus: {gateway.workdir / 'prometheus-scrape.yml'}), "
                  f"HAProxy runtime API {gateway.stats_socket}; "
                  f"kill -HUP {os.getpid()}: rolling restart", flush=True)
        try:
            while gateway.proc.poll() is None:
                if hup:
                    hup.clear()
                    fleet.rolling_restart()
                for server in fleet.servers:
                    if not server.running():
                        if fleet.n == 1:
                            return 1  # the one server died
                        print(f"fleet: replica {server.replica_id} exited ({server.proc.returncode}): "
                              "restarting it", flush=True)
                        fleet.restart(server.replica_id, drain=False)
                time.sleep(0.5)
        except KeyboardInterrupt:
            return 0
    return 1  # the gateway died


if __name__ == "__main__":
    sys.exit(main())
