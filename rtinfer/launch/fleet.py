"""N Triton replicas on loopback behind one gateway, sharing one Redis replay store (issue 21).

    fleet = Fleet(2, audit_root="build/audit", keyring=...)   # a context manager
    fleet.gateway          # HAProxy in front (rtinfer.launch.gateway.Gateway), balanced per request
    fleet.servers          # the replicas (rtinfer.launch.server.TritonServer), ids r1..rN
    fleet.rolling_restart()

What is per replica: its tritonserver process and ports, its replica id (``$RTINFER_REPLICA_ID``,
named in its audit records and by the gateway's server), its audit directory ``<audit_root>/<id>``
(its own hash chains and signed checkpoints). What is shared: the model repository, the keyring and
internal key, the audit signing key, and the replay store (envelope nonces and audit-context MACs):
one Redis (``rtinfer.launch.redis_server.RedisServer``, started here unless ``redis_url`` names one), so an
envelope admitted by one replica is refused ``replayed`` by every other.

One replica is what ``make serve`` always ran: its audit directory is ``audit_root`` itself, it has no
replica id and keeps the SQLite replay store there; no Redis.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from rtinfer.launch.gateway import Gateway
from rtinfer.launch.process import free_port
from rtinfer.launch.server import ROOT, TritonServer

# What the stages read when their parameters are empty (rtinfer.stage_config)
REPLAY_STORE_ENV, REDIS_PASSWORD_ENV, FLEET_ENV = ("RTINFER_REPLAY_STORE", "RTINFER_REDIS_PASSWORD_FILE",
                                                   "RTINFER_FLEET_REPLICAS")


def replica_ids(n: int) -> list[str]:
    return [f"r{i}" for i in range(1, n + 1)]


def log(msg: str) -> None:
    print(f"fleet: {msg}", flush=True)


class Fleet:
    """``replicas`` tritonservers (own ports, audit directory, replica id) + one Redis when there are
    several + the gateway in front; started and stopped together (a context manager)."""

    def __init__(self, replicas: int = 2, *, audit_root: str | os.PathLike, keyring: str | None = None,
                 audit_signing_key: str | None = None, models=("pipeline",),
                 model_repository: str | os.PathLike = ROOT / "model_repository", config_name: str | None = "auto",
                 api_key: str = "", admin_key: str = "", replay_store: str | None = None,
                 redis_url: str | None = None, redis_password_file: str | None = None,
                 triton_http_port: int = 0, triton_grpc_port: int = 0, triton_metrics_port: int = 0,
                 workdir: str | os.PathLike = ROOT / "build" / "fleet", server_env: dict | None = None,
                 progress=log, **gateway_kwargs):
        if replicas < 1:
            raise ValueError("a fleet has at least one replica")
        self.n = replicas
        self.audit_root = Path(audit_root)
        self.workdir = Path(workdir)
        self.progress = progress or (lambda msg: None)
        # "redis" (the default with several replicas) or "sqlite" (the default, and the only sensible
        # store, for one: per replica, so several replicas on SQLite would not share their nonces)
        self.replay_store = replay_store or ("redis" if replicas > 1 else "sqlite")
        if self.replay_store not in ("redis", "sqlite"):
            raise ValueError(f"replay_store must be redis or sqlite, not {self.replay_store!r}")
        self.redis_url, self.redis_password_file = redis_url, redis_password_file
        self.redis = None  # the RedisServer started here, if any
        self.ids = replica_ids(replicas) if replicas > 1 else [None]
        ports = [(triton_http_port, triton_grpc_port, triton_metrics_port)]
        if replicas > 1:  # replica i (from 0) on base + 10 i, or free ports
            ports = [tuple(base + 10 * i if base else 0 for base in ports[0]) for i in range(replicas)]
        self.server_kwargs = dict(model_repository=model_repository, models=models, keyring=keyring,
                                  config_name=config_name, audit_signing_key=audit_signing_key,
                                  api_key=api_key, admin_key=admin_key)
        self.server_env = dict(server_env or {})
        self.ports = ports
        self.servers: list[TritonServer] = []
        self.gateway_kwargs = {"workdir": self.workdir / "gateway", **gateway_kwargs,
                               "api_keys": [api_key] if api_key else gateway_kwargs.get("api_keys", ())}
        self.gateway: Gateway | None = None

    # ---------------------------------------------------------------- layout

    def audit_dir(self, replica_id: str | None) -> Path:
        return self.audit_root / replica_id if replica_id else self.audit_root

    def server(self, replica_id: str) -> TritonServer:
        for s in self.servers:
            if (s.replica_id or "triton") == replica_id:
                return s
        raise KeyError(replica_id)

    def replay_env(self) -> dict[str, str]:
        """The stages' replay store: Redis (URL + password file) shared by every replica, or SQLite."""
        if self.replay_store == "sqlite":
            return {}  # the stages' default: replay-nonces.sqlite3 in each replica's audit directory
        if self.redis is not None:
            return dict(self.redis.env)
        env = {REPLAY_STORE_ENV: self.redis_url}
        if self.redis_password_file:
            env[REDIS_PASSWORD_ENV] = str(Path(self.redis_password_file).resolve())
        return env

    # ---------------------------------------------------------------- start / stop

    def start(self) -> "Fleet":
        if self.n > 1 and any(self.audit_root.glob("*.jsonl")):
            raise ValueError(f"{self.audit_root} holds a single server's audit chains: a fleet's root holds one "
                             "directory per replica (the fleet verify would check only those chains); choose "
                             "another directory")
        try:
            if self.replay_store == "redis" and not self.redis_url:
                from rtinfer.launch.redis_server import RedisServer  # only fleets need it
                self.redis = RedisServer(self.workdir / "redis").start()
                self.redis_url, self.redis_password_file = self.redis.url, self.redis.password_file
                self.progress(f"redis on {self.redis_url} (replay store shared by {self.n} replicas)")
            env = {**self.replay_env(), **self.server_env}
            if self.n > 1:  # every record names the fleet: a replica whose chain is missing fails the verify
                env[FLEET_ENV] = ",".join(self.ids)
            for replica_id, (http, grpc, metrics) in zip(self.ids, self.ports):
                self.servers.append(TritonServer(
                    **self.server_kwargs, audit_dir=str(self.audit_dir(replica_id)), replica_id=replica_id,
                    http_port=http or free_port(), grpc_port=grpc or free_port(), metrics_port=metrics or free_port(),
                    env=env, workdir=self.workdir / "triton" / (replica_id or ""), log_file=None))
            for s in self.servers:  # one at a time: two cores, and each start is CPU-bound
                t0 = time.monotonic()
                s.start()
                if self.n > 1:
                    self.progress(f"replica {s.replica_id} ready in {time.monotonic() - t0:.1f} s: HTTP {s.http_url}"
                                  f"  gRPC {s.grpc_url}  metrics {s.metrics_url}  audit {self.audit_dir(s.replica_id)}")
            self.gateway = Gateway.in_front_of_fleet(self.servers, **self.gateway_kwargs).start()
            for rid in self.gateway.replica_ids:  # health-checked up before the first client
                self.gateway.wait_replica(rid, "UP")
            return self
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        for s in self.servers:
            s.stop()
        if self.redis is not None:
            self.redis.stop()

    def __enter__(self) -> "Fleet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- operations

    def restart(self, replica_id: str, *, drain: bool = True, timeout: float = 120.0) -> dict:
        """Drain the replica at the gateway (no new requests; those in flight finish), stop it, start it
        again (same ports, audit directory, id), wait until it is ready, re-enable it and wait until the
        gateway's health check has it UP. With ``drain=False`` (after a crash) only the restart part.
        Returns the seconds each step took."""
        s, gw, took = self.server(replica_id), self.gateway, {}
        t = time.monotonic()
        if drain:
            gw.drain(replica_id, timeout)
            took["drain_s"] = time.monotonic() - t
        s.stop()
        t = time.monotonic()
        s.start(timeout)
        took["start_s"] = time.monotonic() - t
        gw.set_replica_state(replica_id, "ready")
        took["up_s"] = gw.wait_replica(replica_id, "UP", timeout)
        return {k: round(v, 2) for k, v in took.items()}

    def rolling_restart(self) -> list[dict]:
        """Every replica in turn (restart): with two or more, traffic never stops."""
        out = []
        for s in self.servers:
            rid = s.replica_id or "triton"
            self.progress(f"rolling restart: draining {rid}")
            took = self.restart(rid)
            self.progress(f"rolling restart: {rid} back UP ({took})")
            out.append({"replica": rid, **took})
        return out
