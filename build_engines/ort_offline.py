"""ONNX Runtime graph optimizations applied once at build time and saved, so the server loads a ready graph.

Saved at the "extended" level (fusions such as Conv+activation and QLinearConv, which
run on any x86 CPU), not "all": the layout transforms of "all" are specific to the
build machine's instruction set and ORT applies them again at load time anyway.
"""
from pathlib import Path

from .runtime import session


def optimize(src: Path, dst: Path, level: str = "extended") -> Path:
    session(src, level=level, optimized_path=dst)
    return dst
