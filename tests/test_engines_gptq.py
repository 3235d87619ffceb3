"""GPTQ rounding: on-grid integers, and less output error than rounding to nearest."""
import numpy as np

from build_engines import gptq


def _case(seed=0, rows=16, d=32, n=4000):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((1, rows, d))
    mix = rng.standard_normal((d, d)) * 0.5 + np.eye(d)          # correlated inputs, as after a conv
    x = rng.standard_normal((n, d)) @ mix + 0.3                   # non-zero mean, as after ReLU6
    return w, x, (x.T @ x / n)[None]


def test_gptq_gives_integers_on_the_per_channel_grid():
    w, _, h = _case()
    q, scale = gptq.gptq(w, h)
    assert np.array_equal(q, np.round(q)) and np.abs(q).max() <= 127
    assert np.allclose(scale[0], np.abs(w[0]).max(axis=1) / 127)


def test_gptq_output_error_is_below_round_to_nearest():
    w, x, h = _case()
    q, scale = gptq.gptq(w, h)
    w_gptq = q[0] * scale[0][:, None]
    s = np.abs(w[0]).max(axis=1, keepdims=True) / 127
    w_rtn = np.round(w[0] / s) * s
    err = lambda wq: np.mean((x @ (wq - w[0]).T) ** 2)
    assert err(w_gptq) < 0.7 * err(w_rtn)


def test_gptq_handles_grouped_layers_independently():
    w, _, h = _case(rows=1, d=9)
    w2, _, h2 = _case(seed=1, rows=1, d=9)
    q, s = gptq.gptq(np.concatenate([w, w2]), np.concatenate([h, h2]))
    q1, s1 = gptq.gptq(w, h)
    assert np.array_equal(q[0], q1[0]) and np.allclose(s[0], s1[0])
