"""What the server loads now, and what to build for better: one answer for `make demo` and the serving targets.

The classifier is the CPU variant in ``model_repository/classifier_onnx/1/`` (its manifest names it): the plain
FP32 export that ``make engines-quick`` installs on a fresh clone, or the variant a full build (``make engines``)
chose. The cascade's big model (``classifier_big``) only the full build installs.

    python -m build_engines.installed                    # which variant is served, how to build a better one
    python -m build_engines.installed --models           # the models to expose: pipeline[,cascade]
    python -m build_engines.installed --require-cascade  # exit 2 unless the cascade can load

Light on purpose (no ONNX import): every serving target runs it.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import paths
from .hashing import sha256_file

MODEL = paths.CPU_MODEL_DIR / "model.onnx"
PORTABLE = paths.CPU_MODEL_DIR / "model.portable.onnx"
MANIFEST = paths.CPU_MODEL_DIR / "manifest.json"
BIG_MODEL = paths.REPO / "classifier_big" / "1" / "model.onnx"
QUICK_VARIANT = "source-export"  # what `make engines-quick` installs when no full build's variant is there


def manifest() -> dict | None:
    """The installed variant's manifest, or None unless both files are there and match it (UINT8 input contract)."""
    try:
        m = json.loads(MANIFEST.read_text())
        intact = (m["sha256"] == sha256_file(MODEL) and PORTABLE.exists() and m["inputs"][0]["dtype"] == "uint8")
    except (OSError, KeyError, IndexError, TypeError, ValueError):
        return None
    return m if intact else None


def full_build(m: dict | None = None) -> bool:
    """A full build's variant is installed (not the quick export)."""
    m = manifest() if m is None else m
    return bool(m) and m.get("variant") != QUICK_VARIANT


def cascade_ready() -> bool:
    return BIG_MODEL.exists()


def served_models() -> list[str]:
    """What the gateway exposes: the pipeline, and the cascade once its big model is built."""
    return ["pipeline", "cascade"] if cascade_ready() else ["pipeline"]


def describe(m: dict | None = None) -> str:
    """One line: which variant is served, and how to get a better one."""
    m = manifest() if m is None else m
    if not m:
        return ("no classifier installed: `make engines-quick` exports one in about a minute, "
                "`make engines` builds the optimized one")
    if not full_build(m):
        return "serving the plain FP32 export (no optimized variant built yet: `make engines` builds one)"
    return f"serving the installed variant: {m['variant']} ({m['precision']})"


def cascade_note() -> str:
    return "" if cascade_ready() else \
        "the cascade is not served: its big model (classifier_big) is not built yet: `make engines` builds it"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m build_engines.installed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--models", action="store_true",
                      help="print only the models to expose, comma-separated (what is left out: on stderr)")
    what.add_argument("--require-cascade", action="store_true",
                      help="print nothing, exit 2 (saying why) unless the cascade's big model is built")
    args = p.parse_args(argv)
    m = manifest()
    if not m or not (args.models or args.require_cascade):  # `make engines-quick` said which variant is served
        print(f"[installed] {describe(m)}", file=sys.stderr if args.models else sys.stdout, flush=True)
        return 0 if m else 2
    if args.require_cascade and not cascade_ready():
        print("[installed] this needs the cascade's big model (classifier_big): run `make engines` first")
        return 2
    if args.models:
        if not cascade_ready():
            print(f"[installed] {cascade_note()}", file=sys.stderr, flush=True)
        print(",".join(served_models()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
