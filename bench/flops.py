"""Analytic FLOP counts (forward, per token) and the measured matmul rate that MFU divides by.

A matmul of [in] -> [out] costs 2*in*out per token; attention costs 4*D per visible key (scores and
the weighted sum); a training step (forward + backward) counts 3x the forward. The TTT-MLP inner
loop follows ttt-reference.md: H*(14*d*4d + 6*K*d + 6*K*4d) per token for head size d, mini-batch K.
"""

from __future__ import annotations

import time


def mean_context(T: int, context: int | None) -> float:
    """Mean number of keys a query sees under causal attention with moshi's window."""
    if context is None or context >= T:
        return (T + 1) / 2
    return sum(min(q + 1, context) for q in range(T)) / T


def layer_flops(D: int, hidden: int, T: int, context: int | None) -> float:
    """One transformer layer: in/out projections, SiLU-GLU (linear_in to 2*hidden), attention."""
    return 2 * (D * 3 * D + D * D + D * 2 * hidden + hidden * D) + 4 * D * mean_context(T, context)


def ttt_flops(D: int, heads: int, mini_batch: int = 16) -> float:
    """One TTT-MLP branch: its 4 D x D projections (Q, K, V, O) and the dual-form inner loop."""
    d, K = D // heads, mini_batch
    return 4 * 2 * D * D + heads * (14 * d * 4 * d + 6 * K * d + 6 * K * 4 * d)


def matmul_rate(n: int, dtype: str = "float32") -> float:
    """FLOP/s of a jitted n x n x n jnp matmul in `dtype` (fastest of 5): the peak MFU refers to."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times)
