"""Quantization-aware training: the model learns around the rounding that ONNX Runtime's quantizer will do.

Fake quantization mirrors `quantize.quantize` (per-channel symmetric int8 weights, scale
max|w|/127 per output channel; per-tensor activations, MinMax ranges) at the places its QDQ
quantizer puts them: every Conv/Gemm input, and the outputs of the convs not followed by an
activation (the project convs feeding the residual adds). The CPU flavour's uint8 asymmetric
activations let ORT drop the ReLU6 clips (the conv output takes the clip's range), so the
pre-activation tensors are quantized only in the symmetric TensorRT flavour. BatchNorm stays
frozen and unfolded: per-channel symmetric rounding commutes with the per-channel BN scale, so
rounding the raw weights is rounding the folded ones ORT sees. Gradients pass straight through
the rounding (STE). Ranges come from MinMax calibration on the same images ORT calibrates on
and stay fixed; the trained FP32 weights are exported and quantized by ORT (route b), so the
Q/DQ placement is the one ORT fuses into integer kernels.
"""
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from . import student
from .loop import train


@dataclass(frozen=True)
class Options:
    steps: int = 120
    batch: int = 16
    size: int = 224            # training resolution (the teacher always sees 224)
    views: int = 4             # pool views per photo (shares the distill pool layout)
    lr: float = 1e-5           # the weights start where PTQ has them: small moves only
    # teacher term only: it generalised to held-out classes best (docs/engines.md "Distillation measured")
    alpha: float = 0.0
    tau: float = 1.0
    symmetric: bool = False    # True: int8 symmetric activations (the TensorRT flavour)
    reduce_range: bool = True  # 7-bit weights ([-64, 64]): what ORT's u8s8 kernels need on CPUs without VNNI
    dropout: bool = False      # the model's dropout and drop-connect (0.2 each) during QAT
    mix: bool = False          # mixup/cutmix: their mixed teacher targets are only an approximation of the
                               # teacher on the mixed image; QAT's target is the FP32 model's exact answer
    seed: int = 0
    time_cap_s: float = 420.0
    threads: int = 0

    def key(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("time_cap_s", "threads")}


class WeightFakeQuant(nn.Module):
    """Per-output-channel symmetric int8, scale = max|w| / qmax, straight-through (torch's fused op).
    qmax 127, or 64 with ORT's reduce_range (7-bit weights, `quantize.CPU_7BIT`)."""

    def __init__(self, qmax: int = 127):
        super().__init__()
        self.qmax, self.enabled = qmax, True

    def forward(self, w):
        if not self.enabled:
            return w
        s = (w.detach().abs().amax(dim=tuple(range(1, w.dim()))) / self.qmax).clamp_min(1e-12)
        zp = torch.zeros(len(s), dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, s, zp, 0, -self.qmax, self.qmax)


class ActFakeQuant(nn.Module):
    """Per-tensor activation quantization with a MinMax range; observes (no rounding) while calibrating."""

    def __init__(self, symmetric: bool):
        super().__init__()
        self.symmetric = symmetric
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.observing, self.enabled = False, True

    def forward(self, x):
        if self.observing:
            self.lo.copy_(torch.minimum(self.lo, x.detach().min()))
            self.hi.copy_(torch.maximum(self.hi, x.detach().max()))
            return x
        if not self.enabled:
            return x
        if self.symmetric:   # ORT: int8 in [-127, 127], zero point 0
            s = (torch.maximum(-self.lo, self.hi) / 127.0).clamp_min(1e-12)
            zp, qmin, qmax = torch.zeros((), dtype=torch.int32), -127, 127
        else:                # ORT: uint8, range widened to include 0, zero point rounded
            s = ((self.hi - self.lo) / 255.0).clamp_min(1e-12)
            zp, qmin, qmax = torch.round(-self.lo / s).to(torch.int32), 0, 255
        return torch.fake_quantize_per_tensor_affine(x, s.reshape(()), zp.reshape(()), qmin, qmax)


def _quantized_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def prepare(model: nn.Module, symmetric: bool = False, weight_qmax: int = 127) -> list:
    """Insert fake quantization in place. Returns the activation quantizers (to calibrate)."""
    acts = []

    def attach_input(layer):
        fq = ActFakeQuant(symmetric)
        layer.add_module("input_fq", fq)
        layer.register_forward_pre_hook(lambda mod, inp: (mod.input_fq(inp[0]),) + tuple(inp[1:]))
        acts.append(fq)

    def attach_output(mod):
        fq = ActFakeQuant(symmetric)
        mod.add_module("output_fq", fq)
        mod.register_forward_hook(lambda m, inp, out: m.output_fq(out))
        acts.append(fq)

    for layer in _quantized_layers(model):
        parametrize.register_parametrization(layer, "weight", WeightFakeQuant(weight_qmax))
        attach_input(layer)
    for b in model._blocks:
        attach_output(b._bn2)                         # project conv output: feeds the residual add
        if symmetric:                                 # ReLU6 kept: its input is quantized too
            for name in ("_bn0", "_bn1"):
                if hasattr(b, name):
                    attach_output(getattr(b, name))
    if symmetric:
        attach_output(model._bn0)
        attach_output(model._bn1)
    attach_output(model._fc)                          # the logits (ORT quantizes Gemm's output)
    return acts


def calibrate(model: nn.Module, acts: list, x: np.ndarray, batch: int = 16) -> None:
    """MinMax ranges of the FP32 model (weights unrounded) on ``x`` (float NCHW), as ORT's calibrator."""
    for a in acts:
        a.lo.zero_(), a.hi.zero_()
        a.observing = True
    model.eval()
    weights = [layer.parametrizations.weight[0] for layer in _quantized_layers(model)]
    for w in weights:
        w.enabled = False
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(torch.from_numpy(x[i:i + batch]))
    for w in weights:
        w.enabled = True
    for a in acts:
        a.observing = False


def strip(model: nn.Module) -> nn.Module:
    """Back to a plain FP32 module with the trained (unrounded) weights: ORT does the rounding."""
    for layer in _quantized_layers(model):
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        layer._forward_pre_hooks.clear()
        del layer.input_fq
    for m in model.modules():
        if hasattr(m, "output_fq"):
            m._forward_hooks.clear()
            del m.output_fq
    return model


def logits(model: nn.Module, x: np.ndarray, batch: int = 32) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i:i + batch])).numpy() for i in range(0, len(x), batch)])


def without_dropout(model: nn.Module) -> nn.Module:
    """QAT nudges a trained model by small steps; dropout/drop-connect noise is larger than what it learns."""
    model._dropout.p = 0.0
    model._global_params = model._global_params._replace(drop_connect_rate=0.0)
    return model


def run(pool: dict, calib_x: np.ndarray, opts: Options, ckpt=None, check_x: np.ndarray | None = None) -> tuple:
    """QAT of the pinned Lite0 on ``pool`` (teacher.build_pool) with ranges from ``calib_x`` (float NCHW).
    Returns (the trained FP32 module, log); with ``check_x`` the log holds the fake-quant logits on it
    after training, to check the file ORT quantizes against."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    model = student.load()
    if not opts.dropout:
        without_dropout(model)
    acts = prepare(model, opts.symmetric, 64 if opts.reduce_range else 127)
    calibrate(model, acts, calib_x)
    log = train(model, pool, steps=opts.steps, batch=opts.batch, lr=opts.lr, alpha=opts.alpha, tau=opts.tau,
                seed=opts.seed, ckpt=ckpt, time_limit_s=opts.time_cap_s, tag="qat",
                mix_p=(0.25, 0.25) if opts.mix else (0.0, 0.0))
    if check_x is not None:
        log["fakequant_logits"] = logits(model, check_x)
    log["ranges"] = [(float(a.lo), float(a.hi)) for a in acts]
    return strip(model), {"options": asdict(opts), **log}
