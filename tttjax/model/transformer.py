"""Moshi transformer blocks: RMSNorm, interleaved RoPE, attention with a context window, SiLU-GLU.

One layer class serves both stacks: the temporal transformer (RoPE, one weight set) and the
depformer (no positional embedding, one weight set per codebook step, causal over the steps), in
training and in decoding (an optional cache). Layers are created stacked (leading `layers` axis)
and run with `jax.lax.scan`, so a 32-layer model traces one layer body.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tttjax.model.attention import KVCache, cached_attention, sequence_attention
from tttjax.model.lora import Linear
from tttjax.parallel.sharding import constrain


class RMSNorm(nnx.Module):
    """moshi `rms_norm_f32`: fp32, eps 1e-8, `y = x * alpha / sqrt(eps + mean(x^2))`."""

    def __init__(self, dim: int, *, param_dtype=jnp.float32, eps: float = 1e-8):
        self.eps = eps
        self.alpha = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        y = x * jax.lax.rsqrt(self.eps + jnp.mean(x * x, axis=-1, keepdims=True))
        return (y * self.alpha[...].astype(jnp.float32)).astype(dtype)


def apply_rope(x, positions, max_period: float):
    """Interleaved RoPE on [..., T, H, d] in fp32: pairs (x[2i], x[2i+1]), freq_i = max_period^(-2i/d)."""
    d = x.shape[-1]
    freqs = jnp.exp(jnp.arange(d // 2, dtype=jnp.float32) * (-math.log(max_period) * 2 / d))
    angles = positions.astype(jnp.float32)[:, None, None] * freqs  # [T, 1, d/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], d // 2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


class LayerCache(NamedTuple):
    """What one temporal layer carries between chunks: its KV ring and, in a TTT layer, the TTT state."""

    kv: KVCache
    ttt: object | None  # ttt.TTTState, or None in a layer without TTT


class Attention(nnx.Module):
    """Multi-head self-attention; in_proj columns are laid out (q|k|v, head, head_dim) as moshi's rows.

    One module for training and decoding (as gemma's and moshi's): without a cache it attends over
    the sequence it is given; with a `KVCache` it continues a stream at position `offset`.
    """

    def __init__(self, dim: int, num_heads: int, *, context: int | None, rope_max_period: float | None,
                 steps: int | None, lora_rank: int, lora_scaling: float, param_dtype, dtype, rngs: nnx.Rngs,
                 attention_impl: str):
        self.num_heads = num_heads
        self.context = context
        self.attention_impl = attention_impl  # whole sequences (attention.IMPLS); a cache always uses the ring
        self.rope_max_period = rope_max_period
        common = dict(steps=steps, lora_rank=lora_rank, lora_scaling=lora_scaling,
                      param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.in_proj = Linear(dim, 3 * dim, axes=("embed", "heads"), **common)
        self.out_proj = Linear(dim, dim, axes=("heads", "embed"), **common)

    def __call__(self, x, *, offset=0, cache: KVCache | None = None):
        """x [..., T, D] at positions offset.. -> (out [..., T, D], cache).

        With per-step weights (the depformer in training) x is [S, N, D], steps-major, and the
        attention runs over the S steps. With a cache, x is [B, T, D] and the cache comes back updated.
        """
        steps_major = self.in_proj.steps is not None
        qkv = checkpoint_name(self.in_proj(x), QKV_PROJ)
        if steps_major:
            qkv = jnp.moveaxis(qkv, 0, -2)
        *lead, T, D3 = qkv.shape
        D, H = D3 // 3, self.num_heads
        qkv = qkv.reshape(*lead, T, 3, H, D // H)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        if self.rope_max_period is not None:
            positions = offset + jnp.arange(T)
            q = apply_rope(q, positions, self.rope_max_period)
            k = apply_rope(k, positions, self.rope_max_period)
        if cache is None:
            out = sequence_attention(q.reshape(-1, *q.shape[-3:]), k.reshape(-1, *k.shape[-3:]),
                                     v.reshape(-1, *v.shape[-3:]), self.context, self.attention_impl)
        else:
            out, cache = cached_attention(q, k, v, cache, offset, self.context)
        out = out.reshape(*lead, T, D)
        return self.out_proj(jnp.moveaxis(out, -2, 0) if steps_major else out), cache

    def at_step(self, step: int) -> "Attention":
        """The attention of depformer step `step` alone (its own weight set), for decoding slot by slot."""
        view = nnx.merge(*nnx.split(self))
        view.in_proj, view.out_proj = self.in_proj.at_step(step), self.out_proj.at_step(step)
        return view


class GatedMLP(nnx.Module):
    """moshi ActivationGating: `linear_out(silu(gate) * up)`, linear_in's output split [gate | up]."""

    def __init__(self, dim: int, hidden: int, *, steps: int | None, lora_rank: int, lora_scaling: float,
                 param_dtype, dtype, rngs: nnx.Rngs):
        common = dict(steps=steps, lora_rank=lora_rank, lora_scaling=lora_scaling,
                      param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.linear_in = Linear(dim, 2 * hidden, axes=("embed", "mlp"), **common)
        self.linear_out = Linear(hidden, dim, axes=("mlp", "embed"), **common)

    def __call__(self, x):
        h = self.linear_in(x)
        gate, up = jnp.split(h, 2, axis=-1)
        return self.linear_out(jax.nn.silu(gate) * up)

    def at_step(self, step: int) -> "GatedMLP":
        view = nnx.merge(*nnx.split(self))
        view.linear_in, view.linear_out = self.linear_in.at_step(step), self.linear_out.at_step(step)
        return view


class TransformerLayer(nnx.Module):
    """Pre-norm layer: x + attn(norm1 x) [+ the gated TTT branch] then + ffn(norm2 x); norms shared
    across the depformer's steps."""

    def __init__(self, dim: int, num_heads: int, hidden: int, *, context: int | None,
                 rope_max_period: float | None, steps: int | None, lora_rank: int, lora_scaling: float,
                 param_dtype, dtype, rngs: nnx.Rngs, attention_impl: str):
        common = dict(steps=steps, lora_rank=lora_rank, lora_scaling=lora_scaling,
                      param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.norm1 = RMSNorm(dim, param_dtype=param_dtype)
        self.self_attn = Attention(dim, num_heads, context=context, rope_max_period=rope_max_period,
                                   attention_impl=attention_impl, **common)
        self.norm2 = RMSNorm(dim, param_dtype=param_dtype)
        self.gating = GatedMLP(dim, hidden, **common)

    def __call__(self, x, *, ttt: nnx.Module | None = None, offset=0, cache: LayerCache | None = None):
        """-> (y, cache). `ttt`: the layer's gated TTT branch (`ttt.TTTGatedBlock`), between the two
        sub-blocks (docs/contract.md §4). `cache` (decoding, chunked evaluation) carries the KV ring
        and the TTT state from the previous chunk; it comes back updated."""
        h, kv = self.self_attn(self.norm1(x), offset=offset, cache=None if cache is None else cache.kv)
        x = x + h
        ttt_state = None
        if ttt is not None:
            x, ttt_state = ttt(x, offset=offset, state=None if cache is None else cache.ttt)
        x = x + self.gating(self.norm2(x))
        return x, None if cache is None else LayerCache(kv, ttt_state)

    def at_step(self, step: int) -> "TransformerLayer":
        """Depformer step `step` of this layer (its own weight set, the shared norms)."""
        view = nnx.merge(*nnx.split(self))
        view.self_attn, view.gating = self.self_attn.at_step(step), self.gating.at_step(step)
        return view


def create_stacked(num: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
    """`num` copies of a module with params stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=num, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs):
        return make(rngs)

    return create(rngs)


QKV_PROJ = "qkv_proj"  # the checkpoint name of attention's and TTT's q/k/v projection outputs

_REMAT_POLICIES = {  # config.REMAT_MODES but none
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv": jax.checkpoint_policies.save_only_these_names(QKV_PROJ),
}


def scan_layers(stacked: nnx.Module, x, start: int, stop: int, remat: str = "none", unroll: bool = False,
                batch_axis: int = 0):
    """Run layers [start, stop) of a stacked module over x (batch-sharded on `batch_axis`): a
    lax.scan, or with `unroll` a Python loop that traces every layer: XLA then skips stacking each
    layer's residuals and gradients into [layers, ...] buffers (dynamic-update-slice, zero-fill).
    """
    graphdef, state = nnx.split(stacked)
    names = tuple("batch" if i == batch_axis else None for i in range(x.ndim))

    def body(h, layer_state):
        return constrain(nnx.merge(graphdef, layer_state)(h)[0], names), None

    if remat != "none":
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[remat])
    if not unroll:
        return jax.lax.scan(body, x, jax.tree.map(lambda p: p[start:stop], state))[0]
    for layer_state in _split_layers(state, start, stop):
        x = body(x, layer_state)[0]
    return x


def _split_layers(state, start: int, stop: int) -> list:
    """Per-layer params of layers [start, stop) with one lax.split per param: its transpose is a
    single concatenate, where indexing each layer would pad every layer's gradient to the full
    stack and add them up."""
    leaves, treedef = jax.tree.flatten(state)
    total = leaves[0].shape[0]
    sizes = ([start] if start else []) + [1] * (stop - start) + ([total - stop] if stop < total else [])
    first = 1 if start else 0
    per_leaf = [jax.lax.split(p, sizes, axis=0)[first:first + stop - start] for p in leaves]
    return [jax.tree.unflatten(treedef, [parts[i].reshape(parts[i].shape[1:]) for parts in per_leaf])
            for i in range(stop - start)]


def apply_layer(layer: nnx.Module, x, ttt: nnx.Module | None = None, remat: str = "none"):
    """`layer(x, ttt=ttt)` for a layer run outside a scan (a TTT layer), rematerialised like the scan."""
    if remat == "none":
        return layer(x, ttt=ttt)[0]
    graphdef, state = nnx.split((layer, ttt))

    @functools.partial(jax.checkpoint, policy=_REMAT_POLICIES[remat])
    def run(state, x):
        layer, ttt = nnx.merge(graphdef, state)
        return layer(x, ttt=ttt)[0]

    return run(state, x)


def layer_at(stacked: nnx.Module, index: int) -> nnx.Module:
    """One layer of a stacked module (a view for running it alone, e.g. with a TTT branch)."""
    graphdef, state = nnx.split(stacked)
    return nnx.merge(graphdef, jax.tree.map(lambda p: p[index], state))
