"""What the gateway answers itself about models: a snapshot of their config and metadata, stripped.

Benchmarks and tuners (NVIDIA's perf_analyzer, Model Analyzer) read a model's config and metadata
before they send a request, and for an ensemble the config of every composing model too. The gateway
never forwards a composing model's requests to Triton, so it answers those reads itself, over HTTP,
from this snapshot:

- taken once when the gateway starts (``Gateway.start``), from the first replica over loopback:
  ``GET /v2`` (server metadata), and ``GET /v2/models/<m>`` and ``/v2/models/<m>/config`` of each
  exposed model and, for an ensemble, of each step's model (recursively);
- stripped (``strip``): no ``parameters`` anywhere (they hold key-file paths, audit directories, the
  cloud's URL), none of the fields that name files (model files, label files, warm-up data, the
  backend's runtime file), no repository agents, no metric tags, and no other string that looks like
  a path or a file name; the server metadata lists only the extensions the gateway serves (no
  statistics, model repository, shared memory, trace or logging: a client then does not ask for them);
- written as one line per canonical path, ``<path> TAB <compact JSON>`` (``policy.lua`` reads it at
  start: Lua 5.3 has no JSON parser, and a compact JSON document has no raw tab or newline).

What the snapshot holds is read-only and the same for every replica (one model repository).
"""
from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

# Extensions a client may use through the gateway (haproxy.cfg, policy.lua): everything else that
# Triton advertises is refused there, so the gateway's server metadata does not advertise it.
GATEWAY_EXTENSIONS = ("classification", "sequence", "schedule_policy", "model_configuration",
                      "binary_tensor_data", "parameters")
# Fields dropped wherever they appear (ModelConfig and ModelMetadata, model_config.proto):
DROPPED_FIELDS = frozenset({
    "parameters",               # model parameters: key files, audit directories, the cloud's URL, ...
    "model_repository_agents",  # agents and their parameters (e.g. a decryption key's location)
    "model_warmup",             # warm-up samples name their data files
    "runtime",                  # the backend's runtime file (model.py)
    "metric_tags",              # free-form labels: nothing a client needs
})
# ... and any field whose name says it holds a file, path, directory or address
PATHLIKE_NAME = re.compile(r"(^|_)(file|files|filename|filenames|path|paths|dir|directory|url|uri)$", re.I)
# ... and any string that looks like a path or a file name (model.onnx, /srv/keys, C:\x, ~/x, ./x)
PATHLIKE_VALUE = re.compile(r"[/\\]|^[~.]|^[\w-]+(\.[\w-]+)*\.[A-Za-z][A-Za-z0-9]{0,7}$")


class ModelDocsError(RuntimeError):
    """The snapshot could not be taken (a replica not answering, a step not loaded); ``status``: Triton's HTTP
    status, if it answered."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def pathlike(value: str) -> bool:
    return bool(PATHLIKE_VALUE.search(value))


def strip(doc):
    """A copy of a config or metadata document without parameters, file names, paths or addresses."""
    if isinstance(doc, dict):
        out = {}
        for key, value in doc.items():
            if key in DROPPED_FIELDS or PATHLIKE_NAME.search(key):
                continue
            if isinstance(value, str) and pathlike(value):
                continue
            out[key] = strip(value)
        return out
    if isinstance(doc, list):
        return [strip(v) for v in doc if not (isinstance(v, str) and pathlike(v))]
    return doc


def steps(config: dict) -> list[str]:
    """The models an ensemble's steps name (none for other models)."""
    return [s["model_name"] for s in (config.get("ensemble_scheduling") or {}).get("step", [])]


def _get(base: str, path: str, timeout: float) -> dict:
    try:
        with urllib.request.urlopen(f"http://{base}{path}", timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode(errors="replace")
        raise ModelDocsError(f"GET {path} on {base}: HTTP {exc.code} {detail}", exc.code) from None
    except OSError as exc:
        raise ModelDocsError(f"GET {path} on {base}: {exc}") from None


def snapshot(triton_http: str, models, timeout: float = 10.0) -> dict[str, dict]:
    """Canonical path -> stripped document, for the server and ``models`` with their ensembles' steps,
    read from Triton's HTTP endpoint ``triton_http`` (host:port, loopback). An exposed model Triton does not
    know (not loaded) has no documents (the gateway answers 404 for it, as Triton would refuse it)."""
    server = _get(triton_http, "/v2", timeout)
    docs = {"/v2": {"name": server.get("name", "triton"), "version": server.get("version", ""),
                    "extensions": [e for e in server.get("extensions", []) if e in GATEWAY_EXTENSIONS]}}
    models = list(models)
    todo, seen = list(models), set()
    while todo:
        name = todo.pop(0)
        if name in seen:
            continue
        seen.add(name)
        try:
            metadata = strip(_get(triton_http, f"/v2/models/{name}", timeout))
        except ModelDocsError as exc:
            if name in models and exc.status in (400, 404):
                continue
            raise
        config = _get(triton_http, f"/v2/models/{name}/config", timeout)
        todo += steps(config)
        config = strip(config)
        versions = [f"/v2/models/{name}/versions/{v}" for v in metadata.get("versions", [])]
        for prefix in [f"/v2/models/{name}", *versions]:
            docs[prefix] = metadata
            docs[prefix + "/config"] = config
    return docs


def models_in(docs: dict[str, dict]) -> list[str]:
    """The models a snapshot documents."""
    return sorted({m.group(1) for p in docs if (m := re.fullmatch(r"/v2/models/([^/]+)", p))})


def write(docs: dict[str, dict], path: str | Path) -> Path:
    """One line per path: ``<path>\\t<compact JSON>`` (what policy.lua reads)."""
    lines = []
    for key in sorted(docs):
        body = json.dumps(docs[key], separators=(",", ":"))
        if "\t" in key or "\n" in key or "\n" in body or "\t" in body:  # json.dumps escapes both in strings
            raise ValueError(f"cannot write {key!r} on one line")
        lines.append(f"{key}\t{body}")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def read(path: str | Path) -> dict[str, dict]:
    """The snapshot written by ``write``."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if line:
            key, body = line.split("\t", 1)
            out[key] = json.loads(body)
    return out
