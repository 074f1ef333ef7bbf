"""The measured matmul rate that MFU divides by (the analytic FLOP counts are tttjax/analysis/flops.py)."""

from __future__ import annotations

import time


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
