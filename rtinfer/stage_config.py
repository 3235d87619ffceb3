"""Reads a Python-backend stage's settings from its Triton model config and environment.

Config ``parameters`` win; an empty value falls back to the environment, so one
model repository serves every host and the host's paths stay out of it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from rtinfer import audit, audit_context, checkpoint, internal_key, keyring, replay


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
        )

    def replay_guard(self) -> replay.ReplayGuard:
        """One store for all instances of the stage: by default in the audit directory."""
        return replay.ReplayGuard(self.param("replay_db") or self.audit_dir() / "replay-nonces.sqlite3",
                                  window_s=float(self.param("replay_window_s", str(replay.DEFAULT_WINDOW_S))),
                                  future_skew_s=float(self.param("replay_future_skew_s",
                                                                 str(replay.DEFAULT_FUTURE_SKEW_S))),
                                  busy_timeout_s=float(self.param("replay_busy_timeout_s",
                                                                  str(replay.DEFAULT_BUSY_TIMEOUT_S))))

    def context_store(self) -> replay.ReplayGuard:
        """AUDIT_CTX MACs postprocess has used, kept for the contexts' freshness window (all instances)."""
        return replay.ReplayGuard(self.param("audit_ctx_db") or self.audit_dir() / "audit-ctx.sqlite3",
                                  window_s=float(self.param("audit_ctx_max_age_s",
                                                            str(audit_context.DEFAULT_MAX_AGE_S))),
                                  future_skew_s=5.0,
                                  busy_timeout_s=float(self.param("replay_busy_timeout_s",
                                                                  str(replay.DEFAULT_BUSY_TIMEOUT_S))))

    def classifier_models(self) -> dict[str, str]:
        return classifier_ids(self.param("classifier_models"), self.model_dir.parent)


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
