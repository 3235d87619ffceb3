"""Reads a Python-backend stage's settings from its Triton model config and environment.

Config ``parameters`` win; an empty value falls back to the environment, so one
model repository serves every host and the host's paths stay out of it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
from pathlib import Path

from rtinfer import audit, audit_context, checkpoint, internal_key, keyring, replay

# Which replica of a fleet this server is (every audit record and checkpoint names it; default: the
# host name), and the fleet's replica ids as its launcher knows them (its checkpoints name them, so a
# fleet verify notices a replica whose audit directory is gone). Per process, not per repository:
# every replica loads the same model repository.
ENV_REPLICA, ENV_FLEET = "RTINFER_REPLICA_ID", "RTINFER_FLEET_REPLICAS"
REPLICA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# The replay store when the parameters are empty (a launcher sets these for every replica).
ENV_REPLAY_STORE, ENV_REDIS_PASSWORD, ENV_REDIS_CA = ("RTINFER_REPLAY_STORE", "RTINFER_REDIS_PASSWORD_FILE",
                                                      "RTINFER_REDIS_CA")


class StageConfig:
    def __init__(self, args: dict):
        self.config = json.loads(args["model_config"])
        self.instance = args["model_instance_name"]
        self.model_dir = Path(args["model_repository"])  # <repo>/<model>

    def param(self, key: str, default: str = "") -> str:
        return self.config.get("parameters", {}).get(key, {}).get("string_value", "") or default

    def keyring(self) -> keyring.KeyringSource:
        """Reloaded when the file changes (rotation without a restart)."""
        return keyring.KeyringSource(keyring.resolve_path(self.param("keyring")),
                                     check_s=float(self.param("keyring_check_s", "1")))

    def internal_keys(self) -> internal_key.InternalKeys:
        """The server-internal secret ($RTINFER_INTERNAL_KEY, or beside the keyring), made on first start,
        reloaded when it is rotated."""
        return internal_key.InternalKeys(internal_key.resolve_path(keyring.resolve_path(self.param("keyring"))),
                                         check_s=float(self.param("keyring_check_s", "1")))

    def audit_dir(self) -> Path:
        directory = self.param("audit_dir") or os.environ.get(audit.ENV_DIR)
        if not directory:
            raise RuntimeError(f"no audit directory: set the model parameter 'audit_dir' or ${audit.ENV_DIR}")
        return Path(directory)

    def audit_writer(self) -> audit.AuditWriter:
        key = self.param("audit_signing_key") or os.environ.get(checkpoint.ENV_VAR)
        return audit.AuditWriter(
            self.audit_dir() / f"{self.instance}.jsonl",
            fsync=self.param("audit_fsync", "off"),
            fsync_interval_s=float(self.param("audit_fsync_interval_s", "1")),
            max_bytes=int(self.param("audit_max_bytes", "0")),
            signer=checkpoint.Signer.load(key) if key else None,
            checkpoint_interval_s=float(self.param("audit_checkpoint_interval_s", "30")),
            checkpoint_records=int(self.param("audit_checkpoint_records", "1000")),
            lock_timeout_s=30.0,  # a killed server's stub processes may take a moment to let go
            replica=replica_id(), fleet=fleet_replicas(),
        )

    def replay_store(self) -> str:
        """'sqlite' (one host: the default) or a Redis URL shared by a fleet (``replay_store``, else
        $RTINFER_REPLAY_STORE)."""
        store = self.param("replay_store") or os.environ.get(ENV_REPLAY_STORE) or "sqlite"
        if store != "sqlite" and not store.startswith(("redis://", "rediss://")):
            raise ValueError("replay_store must be 'sqlite' or redis://... / rediss://..., "
                             f"not {store.split('@')[-1]!r}")
        return store

    def replay_guard(self):
        """One store for all instances of the stage: by default SQLite in the audit directory; with a Redis
        ``replay_store``, one for every replica of the fleet (``rtinfer.replay_redis``)."""
        window_s = float(self.param("replay_window_s", str(replay.DEFAULT_WINDOW_S)))
        skew_s = float(self.param("replay_future_skew_s", str(replay.DEFAULT_FUTURE_SKEW_S)))
        if self.replay_store() != "sqlite":
            return self._redis_guard("nonce", window_s, skew_s)
        return replay.ReplayGuard(self.param("replay_db") or self.audit_dir() / "replay-nonces.sqlite3",
                                  window_s=window_s, future_skew_s=skew_s,
                                  busy_timeout_s=float(self.param("replay_busy_timeout_s",
                                                                  str(replay.DEFAULT_BUSY_TIMEOUT_S))))

    def context_store(self):
        """AUDIT_CTX MACs postprocess has used, kept for the contexts' freshness window (all instances; with a
        Redis ``replay_store``, all replicas: a context taken from one replica cannot be used on another)."""
        window_s = float(self.param("audit_ctx_max_age_s", str(audit_context.DEFAULT_MAX_AGE_S)))
        if self.replay_store() != "sqlite":
            return self._redis_guard("ctx", window_s, 5.0)
        return replay.ReplayGuard(self.param("audit_ctx_db") or self.audit_dir() / "audit-ctx.sqlite3",
                                  window_s=window_s, future_skew_s=5.0,
                                  busy_timeout_s=float(self.param("replay_busy_timeout_s",
                                                                  str(replay.DEFAULT_BUSY_TIMEOUT_S))))

    def _redis_guard(self, namespace: str, window_s: float, skew_s: float):
        """The password from a 0600 file (refused to load otherwise), never from the URL or this config. Redis
        not answering at load is logged, not fatal: requests are refused UNAVAILABLE until it answers."""
        from rtinfer import replay_redis
        guard = replay_redis.RedisReplayGuard(
            self.replay_store(), namespace=namespace,
            password_file=self.param("replay_redis_password_file") or os.environ.get(ENV_REDIS_PASSWORD) or None,
            ca_file=self.param("replay_redis_ca") or os.environ.get(ENV_REDIS_CA) or None,
            timeout_ms=float(self.param("replay_redis_timeout_ms", str(replay_redis.DEFAULT_TIMEOUT_MS))),
            window_s=window_s, future_skew_s=skew_s)
        why = guard.check()
        if why:
            print(f"rtinfer {self.instance}: {why}; requests are refused UNAVAILABLE until it answers",
                  file=sys.stderr, flush=True)
        return guard

    def classifier_models(self) -> dict[str, str]:
        return classifier_ids(self.param("classifier_models"), self.model_dir.parent)

    def installed_classifiers(self, spec: str | None = None) -> list[tuple[str, str, str]]:
        """(model, file, sha256) of the classifiers ``spec`` names (default: ``classifier_models``)."""
        return installed_classifiers(self.param("classifier_models") if spec is None else spec, self.model_dir.parent)


def replica_id() -> str:
    """$RTINFER_REPLICA_ID, else the host name (a Kubernetes pod's name). Names a directory in a fleet root."""
    rid = os.environ.get(ENV_REPLICA) or socket.gethostname()
    if not REPLICA_ID.fullmatch(rid):
        raise ValueError(f"replica id {rid!r} (${ENV_REPLICA} or the host name) must match {REPLICA_ID.pattern}")
    return rid


def fleet_replicas() -> list[str] | None:
    """$RTINFER_FLEET_REPLICAS: the fleet's replica ids, comma-separated (None when not set)."""
    raw = os.environ.get(ENV_FLEET, "")
    ids = sorted({r.strip() for r in raw.split(",") if r.strip()})
    for rid in ids:
        if not REPLICA_ID.fullmatch(rid):
            raise ValueError(f"${ENV_FLEET}: replica id {rid!r} must match {REPLICA_ID.pattern}")
    return ids or None


def installed_classifiers(spec: str, repo: Path) -> list[tuple[str, str, str]]:
    """'name=model[/file],...' -> (model, file, sha256 of the file on disk) of each classifier named, once:
    what this replica serves (exported as rtinfer_model_info; a fleet whose replicas differ is mid-rollout
    or wrong). The file is the one named, else the manifest's main artifact; 'missing' when it is not there."""
    out = []
    for item in filter(None, spec.split(",")):
        model, _, filename = item.split("=", 1)[1].partition("/")
        if not filename:
            try:
                filename = json.loads((repo / model / "1" / "manifest.json").read_text()).get("artifact", "")
            except (OSError, ValueError):
                filename = ""
        entry = (model, filename or "unknown", _file_sha256(repo / model / "1" / filename) if filename else "missing")
        if entry not in out:
            out.append(entry)
    return out


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return "missing"
    return digest.hexdigest()


def classifier_ids(spec: str, repo: Path) -> dict[str, str]:
    """'pipeline=model[/file],...' -> {pipeline: 'model/1[:file]@sha256 prefix'}, read once at load.

    A manifest can list several files (the CPU file and a portable one); naming the file
    this host's config of the model loads makes the audit name the one that answered.
    Without a file, the manifest's main artifact."""
    out = {}
    for item in filter(None, spec.split(",")):
        pipeline, target = item.split("=", 1)
        model, _, filename = target.partition("/")
        name = f"{model}/1:{filename}" if filename else f"{model}/1"
        out[pipeline] = f"{name}@{_digest(repo / model / '1' / 'manifest.json', filename)}"
    return out


def _digest(manifest: Path, filename: str) -> str:
    try:
        doc = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return "no-manifest"
    for entry in (doc, *(v for v in doc.values() if isinstance(v, dict))):
        if entry.get("artifact") == (filename or doc.get("artifact")):
            return entry.get("sha256", "")[:16]
    return "not-in-manifest"
