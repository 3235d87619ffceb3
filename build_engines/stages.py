"""Incremental stages: skip work whose inputs (weights, code, options, images) are unchanged.

A stage writes `.stamp.json` in its output directory with the hash of its inputs
and the sha256 of each output; it is up to date only if both still match.
"""
import json
import time
from pathlib import Path
from typing import Callable, Iterable

from .hashing import sha256_file, sha256_json


def _stamp_path(out_dir: Path) -> Path:
    return out_dir / ".stamp.json"


def is_up_to_date(out_dir: Path, key: str, outputs: Iterable[Path]) -> bool:
    stamp = _stamp_path(out_dir)
    if not stamp.exists():
        return False
    try:
        data = json.loads(stamp.read_text())
    except json.JSONDecodeError:
        return False
    if data.get("key") != key:
        return False
    for p in outputs:
        if not p.exists() or data.get("outputs", {}).get(str(p)) != sha256_file(p):
            return False
    return True


def run_stage(name: str, out_dir: Path, inputs: dict, outputs: list, build: Callable[[], None]) -> bool:
    """Run `build` unless the stage is up to date. Returns True if it (re)built.

    `out_dir` holds the stamp; `outputs` may live elsewhere (e.g. the model repository).
    """
    key = sha256_json(inputs)
    if is_up_to_date(out_dir, key, outputs):
        print(f"[{name}] up to date", flush=True)
        return False
    print(f"[{name}] building ...", flush=True)
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    build()
    missing = [str(p) for p in outputs if not p.exists()]
    if missing:
        raise RuntimeError(f"stage {name} did not produce {missing}")
    _stamp_path(out_dir).write_text(json.dumps(
        {"key": key, "inputs": inputs, "outputs": {str(p): sha256_file(p) for p in outputs}},
        indent=2, sort_keys=True, default=str))
    print(f"[{name}] done in {time.perf_counter() - t0:.1f} s", flush=True)
    return True


def stage_key(out_dir: Path) -> str:
    """The input key a stage was last built with (used to chain stages)."""
    return json.loads(_stamp_path(out_dir).read_text())["key"]
