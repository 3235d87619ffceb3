"""Reads a Python-backend stage's settings from its Triton model config and environment.

Config ``parameters`` win; an empty value falls back to the environment, so one
model repository serves every host and the host's paths stay out of it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from rtinfer import audit, checkpoint, keyring, replay


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
                                                                 str(replay.DEFAULT_FUTURE_SKEW_S))))

    def classifier_models(self) -> dict[str, str]:
        """pipeline -> 'model (sha256 prefix of the installed file)', read once at load."""
        out = {}
        for item in filter(None, self.param("classifier_models").split(",")):
            pipeline, model = item.split("=", 1)
            manifest = self.model_dir.parent / model / "1" / "manifest.json"
            try:
                digest = json.loads(manifest.read_text()).get("sha256", "")[:16]
            except (OSError, ValueError):
                digest = "no-manifest"
            out[pipeline] = f"{model}/1@{digest}"
        return out
