"""An engine's optimization profile, derived from its Triton model config.

The config is the one place batch sizes are decided: Triton never sends a batch
larger than ``max_batch_size``, and dynamic batching mostly forms its preferred
sizes, so the engine is tuned for those (min 1, opt = largest preferred size,
max = max_batch_size). Pure functions: tests call them without TensorRT.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

# Triton data types -> ONNX TensorProto element types (the subset an image classifier uses).
ONNX_ELEM_TYPE = {"TYPE_FP32": 1, "TYPE_UINT8": 2, "TYPE_INT8": 3, "TYPE_INT32": 6, "TYPE_INT64": 7,
                  "TYPE_BOOL": 9, "TYPE_FP16": 10, "TYPE_BF16": 16}


@dataclass(frozen=True)
class TensorProfile:
    """min/opt/max shapes of one engine input, batch dimension included."""
    name: str
    data_type: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def as_dict(self) -> dict:
        return {"name": self.name, "data_type": self.data_type,
                "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def load_config(path: Path) -> mc.ModelConfig:
    cfg = mc.ModelConfig()
    text_format.Parse(Path(path).read_text(), cfg)
    return cfg


def dtype_name(value: int) -> str:
    return mc.DataType.Name(value)


def batch_sizes(cfg: mc.ModelConfig) -> tuple[int, int, int]:
    """(min, opt, max) batch for the engine; (1, 1, 1) for a model Triton does not batch."""
    if cfg.max_batch_size <= 0:
        return 1, 1, 1
    preferred = [b for b in cfg.dynamic_batching.preferred_batch_size] if cfg.HasField("dynamic_batching") else []
    too_big = [b for b in preferred if b > cfg.max_batch_size or b < 1]
    if too_big:
        raise ValueError(f"{cfg.name}: preferred_batch_size {too_big} outside 1..max_batch_size {cfg.max_batch_size}")
    return 1, max(preferred, default=cfg.max_batch_size), cfg.max_batch_size


def profile_from_config(cfg: mc.ModelConfig) -> list[TensorProfile]:
    """One TensorProfile per config input; the batch dimension is prepended only when Triton batches."""
    lo, opt, hi = batch_sizes(cfg)
    out = []
    for inp in cfg.input:
        dims = tuple(int(d) for d in inp.dims)
        if any(d < 1 for d in dims) or inp.HasField("reshape"):
            raise ValueError(f"{cfg.name}: input {inp.name} must have fixed dims and no reshape "
                             f"to derive an engine profile (dims {list(dims)})")
        if cfg.max_batch_size > 0:
            shapes = [(b, *dims) for b in (lo, opt, hi)]
        else:
            shapes = [dims] * 3
        out.append(TensorProfile(inp.name, dtype_name(inp.data_type), *shapes))
    if not out:
        raise ValueError(f"{cfg.name}: no inputs")
    return out
