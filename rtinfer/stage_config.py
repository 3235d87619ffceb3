"""Reads a Python-backend stage's settings from its Triton model config and environment.

Config ``parameters`` win; an empty value falls back to the environment, so one
model repository serves every host and the host's paths stay out of it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from rtinfer import audit, keyring


class StageConfig:
    def __init__(self, args: dict):
        self.config = json.loads(args["model_config"])
        self.instance = args["model_instance_name"]
        self.model_dir = Path(args["model_repository"])  # <repo>/<model>

    def param(self, key: str, default: str = "") -> str:
        return self.config.get("parameters", {}).get(key, {}).get("string_value", "") or default

    def keyring(self) -> keyring.Keyring:
        return keyring.Keyring.from_env_or(self.param("keyring"))

    def audit_writer(self) -> audit.AuditWriter:
        directory = self.param("audit_dir") or os.environ.get(audit.ENV_DIR)
        if not directory:
            raise RuntimeError(f"no audit directory: set the model parameter 'audit_dir' or ${audit.ENV_DIR}")
        fsync = self.param("audit_fsync", "false").lower() in ("1", "true", "yes")
        return audit.AuditWriter(Path(directory) / f"{self.instance}.jsonl", fsync=fsync)

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
