"""Content hashes: manifests and incremental builds both key on bytes, not timestamps."""
import hashlib
import json
from pathlib import Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj) -> str:
    """Hash of a JSON-able value with sorted keys, so equal inputs give equal keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def code_hash(*module_names: str) -> str:
    """Hash of the named build_engines modules' source (``train/loop`` for subpackages), so editing build code
    triggers a rebuild."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in sorted(set(module_names)):
        h.update(name.encode())
        h.update((here / f"{name}.py").read_bytes())
    return h.hexdigest()
