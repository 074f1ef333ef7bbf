"""Bias-free Linear with optional LoRA (moshi semantics) and optional per-step weights.

moshi wraps every nn.Linear in a LoRALinear: `y = W x + scaling * B(A x)`, `scaling` a plain
multiplier (not alpha/rank), B zero-initialised (moshi-finetune re-initialises A with
kaiming_uniform(a=sqrt(5)) and B with zeros). The depformer keeps one weight set per codebook
step; here they are one stacked parameter with a leading `steps` axis, applied with an einsum.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def torch_default_init(fan_in: int):
    """torch nn.Linear / kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


class Linear(nnx.Module):
    """`x @ kernel` (kernel stored [in, out], torch weight transposed) with optional LoRA.

    steps: None for one weight; S for S stacked weights ([S, in, out]). With steps, the input is
      either [S, ..., in] (slot s uses weight s) or, if `broadcast_input`, [..., in] (every
      weight sees the same input); the output is [S, ..., out]. Steps lead so that each slot is
      one plain batched matmul, with no transposes around it.
    """

    def __init__(self, in_features: int, out_features: int, *, axes: Axes, steps: int | None = None,
                 broadcast_input: bool = False, lora_rank: int = 0, lora_scaling: float = 1.0,
                 param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs):
        self.steps = steps
        self.broadcast_input = broadcast_input
        self.lora_scaling = lora_scaling
        self.dtype = dtype
        lead = () if steps is None else (steps,)
        lead_axes = () if steps is None else ("depth_steps",)
        init = torch_default_init(in_features)
        self.kernel = nnx.Param(init(rngs.params(), lead + (in_features, out_features), param_dtype),
                                out_sharding=lead_axes + tuple(axes))
        if lora_rank:
            self.lora_a = nnx.Param(init(rngs.params(), lead + (in_features, lora_rank), param_dtype),
                                    out_sharding=lead_axes + (axes[0], "lora_rank"))
            self.lora_b = nnx.Param(jnp.zeros(lead + (lora_rank, out_features), param_dtype),
                                    out_sharding=lead_axes + ("lora_rank", axes[1]))
        else:
            self.lora_a = self.lora_b = None

    def _apply(self, x, kernel):
        kernel = kernel.astype(self.dtype)
        if self.steps is None:
            return x @ kernel
        if self.broadcast_input:
            return jnp.einsum("...i,sio->s...o", x, kernel)
        return jnp.einsum("s...i,sio->s...o", x, kernel)

    def __call__(self, x):
        x = x.astype(self.dtype)
        y = self._apply(x, self.kernel[...])
        if self.lora_a is not None:
            a = self._apply(x, self.lora_a[...])
            lora_b = self.lora_b[...].astype(self.dtype)
            b = a @ lora_b if self.steps is None else jnp.einsum("s...r,sro->s...o", a, lora_b)
            y = y + self.lora_scaling * b
        return y

    def at_step(self, step: int) -> "Linear":
        """Weight set `step` of a per-step Linear as a Linear of its own (same arrays, sliced): a frame
        of decoding runs one depformer slot, and slicing the stack inside the step would copy it."""
        view = nnx.merge(*nnx.split(self))
        for name in ("kernel", "lora_a", "lora_b"):
            if getattr(self, name) is not None:
                setattr(view, name, nnx.Param(getattr(self, name)[...][step]))
        view.steps, view.broadcast_input = None, False
        return view
