"""The training loop: a fixed step budget (a time cap on top), progress with an ETA, resumable checkpoints.

Batches, mixup/cutmix and dropout are drawn from generators seeded by the step number, so a run
resumed from a checkpoint draws what the uninterrupted run would have drawn.
"""
import math
import time
from pathlib import Path

import numpy as np
import torch

from rtinfer import imaging

from .augment import mix
from .loss import distillation_loss
from .student import freeze_bn


def _lr(step: int, steps: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(model: torch.nn.Module, pool: dict, *, steps: int, batch: int = 32, lr: float = 1e-4,
          alpha: float = 0.0, tau: float = 2.0, seed: int = 0, ckpt: Path | None = None, ckpt_every: int = 25,
          time_limit_s: float | None = None, log_every: int = 10, tag: str = "distill",
          mix_p: tuple = (0.25, 0.25)) -> dict:
    """Train ``model`` in place on ``pool`` (teacher.build_pool). Returns losses and timings."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-5)
    start, history = 0, []
    if ckpt is not None and Path(ckpt).exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, history = state["step"], state["history"]
        print(f"  [{tag}] resuming at step {start}/{steps}", flush=True)
    n, t0, done = len(pool["x"]), time.perf_counter(), start
    teacher = torch.from_numpy(pool["teacher"])
    y = torch.from_numpy(pool["y"])
    freeze_bn(model)
    for step in range(start, steps):
        rng = np.random.default_rng([seed, step])
        torch.manual_seed(seed * 1_000_003 + step)   # dropout / drop-connect draws, so a resumed run matches
        idx = rng.choice(n, size=min(batch, n), replace=False)
        x = torch.from_numpy(imaging.normalize(pool["x"][idx]))
        p_t = torch.softmax(teacher[idx] / tau, dim=1)
        yi = y[idx]
        onehot = torch.zeros(len(idx), teacher.shape[1])
        onehot[yi >= 0] = torch.nn.functional.one_hot(yi[yi >= 0], teacher.shape[1]).float()
        x, (p_t, onehot) = mix(x, [p_t, onehot], rng, *mix_p)
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup=max(1, steps // 20))
        loss = distillation_loss(model(x), p_t, onehot if (yi >= 0).any() else None, alpha, tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        done = step + 1
        elapsed = time.perf_counter() - t0
        if done % log_every == 0 or done == steps:
            rate = (done - start) / elapsed
            print(f"  [{tag}] step {done}/{steps} loss {np.mean(history[-log_every:]):.4f} "
                  f"{rate * batch:.1f} img/s, ETA {(steps - done) / rate:.0f} s", flush=True)
        capped = time_limit_s is not None and elapsed > time_limit_s and done < steps
        if ckpt is not None and (done % ckpt_every == 0 or done == steps or capped):
            tmp = Path(ckpt).with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": done, "history": history}, tmp)
            tmp.replace(ckpt)
        if capped:
            print(f"  [{tag}] time cap {time_limit_s:.0f} s reached at step {done}/{steps}", flush=True)
            break
    model.eval()
    k = max(1, min(20, len(history) // 4))
    return {"steps_done": done, "steps": steps, "seconds": time.perf_counter() - t0,
            "loss_first": float(np.mean(history[:k])) if history else None,
            "loss_last": float(np.mean(history[-k:])) if history else None, "history": history}
