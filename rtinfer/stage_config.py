"""Reads a Python-backend stage's settings from its Triton model config and environment, and builds the stages.

Config ``parameters`` win; an empty value falls back to the environment, so one
model repository serves every host and the host's paths stay out of it. The factories
(``preprocessor``, ``postprocessor``, ``cloud_leg``, ``cascade``) build what the three
adapters (preprocess, postprocess, cascade) run, so each adapter only converts tensors.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from rtinfer import audit, audit_context, checkpoint, imaging, internal_key, keyring, labels, replay, routing
from rtinfer.cascade import Cascade
from rtinfer.postprocess import Postprocessor
from rtinfer.preprocess import DEFAULT_MAX_ENVELOPE_BYTES, Preprocessor

# Which replica of a fleet this server is (every audit record and checkpoint names it; default: the
# host name), and the fleet's replica ids as its launcher knows them (its checkpoints name them, so a
# fleet verify notices a replica whose audit directory is gone). Per process, not per repository:
# every replica loads the same model repository.
ENV_REPLICA, ENV_FLEET = "RTINFER_REPLICA_ID", "RTINFER_FLEET_REPLICAS"
REPLICA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# The replay store when the parameters are empty (a launcher sets these for every replica).
ENV_REPLAY_STORE, ENV_REDIS_PASSWORD, ENV_REDIS_CA = ("RTINFER_REPLAY_STORE", "RTINFER_REDIS_PASSWORD_FILE",
                                                      "RTINFER_REDIS_CA")


@dataclass(frozen=True)
class CascadeModels:
    edge: str  # the edge classifier (this server, BLS)
    edge_file: str  # its file, where the model has several ("" = the manifest's main artifact)
    big: str  # the big classifier in this server (BLS), when no remote cloud is set
    big_size: int  # the big classifier's input size (crop)

    @property
    def edge_spec(self) -> str:
        return f"e={self.edge}/{self.edge_file}".rstrip("/")

    def served(self, remote: bool) -> str:
        """The classifiers this replica serves, as ``installed_classifiers`` reads them."""
        return self.edge_spec if remote else f"{self.edge_spec},c={self.big}"


class StageConfig:
    def __init__(self, args: dict):
        self.config = json.loads(args["model_config"])
        self.instance = args["model_instance_name"]
        self.model_dir = Path(args["model_repository"])  # <repo>/<model>
        self.version = str(args.get("model_version", "1"))  # what the audit records name as the stage's version

    def param(self, key: str, default: str = "") -> str:
        return self.config.get("parameters", {}).get(key, {}).get("string_value", "") or default

    def dims(self, tensor: str) -> list[int] | None:
        """The dims of an input or output of this model's config (the batch dimension left out), None if the
        config names no such tensor."""
        for item in self.config.get("input", []) + self.config.get("output", []):
            if item.get("name") == tensor:
                return [int(d) for d in item.get("dims", [])]
        return None

    def preprocessor(self, *, stage: str = "preprocess", keep_plaintext: bool = False) -> Preprocessor:
        """The preprocess stage as the parameters say: keyring, audit chain, replay store, limits, crop.
        The cascade: ``stage="cascade"``, ``keep_plaintext`` (the image bytes, for the big model or the cloud)."""
        p = self.param
        return Preprocessor(
            self.keyring(), self.audit_writer(), pipelines=set(p("pipelines", stage).split(",")),
            replay=self.replay_guard(),
            max_envelope_bytes=int(p("max_envelope_bytes", str(DEFAULT_MAX_ENVELOPE_BYTES))),
            max_pixels=int(p("max_pixels", str(imaging.DEFAULT_MAX_PIXELS))), version=self.version,
            crop=p("crop", imaging.DEFAULT_CROP),
            crop_by_pipeline=dict(kv.split("=", 1) for kv in p("crop_by_pipeline").split(",") if kv),
            jpeg_draft=p("jpeg_draft", "true").lower() == "true", ctx_key=self.internal_keys(),
            keep_plaintext=keep_plaintext, stage=stage)

    def postprocessor(self, *, stage: str = "postprocess", sharing: Preprocessor | None = None) -> Postprocessor:
        """The postprocess stage: one label per class of PROBS (checked against this config's dims).
        ``sharing``: the cascade's preprocessor, whose audit chain (one per cascade instance), keyring and
        internal keys it uses."""
        names = labels.names()
        dims = self.dims("PROBS")
        if dims and dims[-1] != len(names):
            raise ValueError(f"{self.config.get('name', 'this model')}: PROBS has {dims[-1]} classes, "
                             f"the label file {len(names)}")
        return Postprocessor(
            sharing.audit if sharing else self.audit_writer(), names, models=self.classifier_models(),
            version=self.version, keyring=sharing.keys if sharing else self.keyring(),
            internal_keys=sharing.ctx_key if sharing else self.internal_keys(), ctx_store=self.context_store(),
            stage=stage)

    def cloud_leg(self):
        """The cascade's remote cloud (``rtinfer.cloud_leg.CloudLeg``) when ``cloud_url`` is set, else None (the
        big model in this server answers escalations)."""
        p = self.param
        if not p("cloud_url"):
            return None
        from rtinfer import access
        from rtinfer.cloud_leg import CloudLeg
        ring = keyring.Keyring.load(keyring.resolve_path(p("cloud_keyring")))
        return CloudLeg(
            p("cloud_url"), key=ring.key(p("cloud_key_id")), key_id=p("cloud_key_id"),
            client_id=p("cloud_client_id", "edge"), pipeline=p("cloud_pipeline", "pipeline"),
            api_key=access.read_secret(file=p("cloud_api_key_file") or None), tls_ca=p("cloud_tls_ca") or None,
            insecure_loopback_only=access.flag("cloud_insecure_loopback_only", p("cloud_insecure_loopback_only")),
            deadline_s=float(p("cloud_deadline_s", "1.0")), attempts=int(p("cloud_attempts", "2")),
            breaker=routing.Breaker(failures=int(p("cloud_breaker_failures", "3")),
                                    reset_s=float(p("cloud_breaker_reset_s", "5"))))

    def cascade_models(self) -> CascadeModels:
        """The classifiers the cascade asks (``edge_model``[/``edge_model_file``], ``cloud_model`` at
        ``cloud_size``)."""
        p = self.param
        return CascadeModels(p("edge_model", "classifier_onnx"), p("edge_model_file"),
                             p("cloud_model", "classifier_big"), int(p("cloud_size", "260")))

    def cascade(self, pre: Preprocessor, post: Postprocessor, cloud=None) -> Cascade:
        """The cascade's logic: the decision (``confidence_metric``, ``threshold``) and the ids its audit records
        give the edge and cloud classifiers (a remote ``cloud``: its URL and pipeline)."""
        m, repo = self.cascade_models(), self.model_dir.parent
        cloud_id = cloud.model_id if cloud else classifier_ids(f"c={m.big}", repo)["c"]
        policy = routing.Policy(self.param("confidence_metric", "top1"), float(self.param("threshold", "0.5")))
        return Cascade(pre, post, policy, edge_model=classifier_ids(m.edge_spec, repo)["e"], cloud_model=cloud_id)

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
