"""The GPU an engine is built for, read from the CUDA driver (libcuda) through ctypes.

Engines are specific to a GPU architecture, so the manifest, the incremental-build
key and per-architecture file names need the compute capability. The driver API is
present wherever a GPU is usable (no pycuda / cuda-python needed), and its absence
is how a CPU host says "no GPU".
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

_CC_MAJOR, _CC_MINOR = 75, 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_{MAJOR,MINOR}


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: str  # "8.6", as Triton's cc_model_filenames keys spell it

    @property
    def sm(self) -> str:
        return "sm" + self.compute_capability.replace(".", "")


def probe(ordinal: int = 0) -> Gpu | None:
    """The CUDA device TensorRT builds on by default (ordinal 0 after CUDA_VISIBLE_DEVICES), or None."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count, dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    if (cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= ordinal
            or cuda.cuDeviceGet(ctypes.byref(dev), ordinal) != 0
            or cuda.cuDeviceGetName(name, len(name), dev) != 0
            or cuda.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, dev) != 0
            or cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, dev) != 0):
        return None
    return Gpu(name.value.decode(errors="replace"), f"{major.value}.{minor.value}")
