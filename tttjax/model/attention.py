"""Attention over q, k, v (no parameters): moshi's causal window, full-sequence and with a ring KV cache.

Window (moshi's `context`): the key at position k is visible from the query at position q iff
0 <= q - k < context (context None: every earlier key). Scores and softmax in fp32.

A whole sequence (training, the teacher-forced forward) goes through `sequence_attention`, by
implementation (`model.attention_impl`):

* `xla` (`full_attention`): every T x T score at once; the reference, fastest for small T.
* `blockwise`: query blocks against the key blocks that meet their window, online softmax in
  fp32 and a custom VJP that recomputes the scores block by block: memory O(T x window), no
  T x T array, any backend.
* `splash`: TPU Pallas splash attention with a local (sliding-window) mask, under shard_map over
  the mesh's batch and head axes; elsewhere it runs in Pallas interpret mode (tests).
* `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` with a local window (GPU).
* `auto`: splash on TPU, cudnn on GPU (bf16/fp16), else blockwise beyond AUTO_BLOCKWISE_MIN_FRAMES.

`cached_attention` continues a stream: a chunk of T >= 1 queries at positions offset.. over a ring
cache of earlier keys (moshi's `RingKVCache`) plus the chunk's own; the chunk is written into the
ring. Decoding (T = 1) and chunked evaluation run it; both give the full forward's values.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash_kernel,
)
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as splash_mask,
)

from tttjax.model.config import check_attention_impl
from tttjax.parallel.sharding import fit_spec, logical_to_spec

# `auto` on CPU: the full-score path (the reference) up to this many frames, blockwise beyond, where
# full scores grow with T^2 (BENCHMARKS.md: 10 GiB for 2 heads at 16k frames, 34x blockwise's;
# blockwise was also 1.4-1.9x faster at 128-1024 frames, but short sequences keep the reference).
AUTO_BLOCKWISE_MIN_FRAMES = 1024
BLOCK_FRAMES = 256  # blockwise: largest query/key block


def resolve_impl(impl: str, platform: str, frames: int, dtype=jnp.bfloat16) -> str:
    """The implementation `impl` ("auto" or a name from ATTENTION_IMPLS) means on `platform` for T = `frames`
    frames in compute dtype `dtype` (cuDNN's fused attention takes bf16/fp16 only)."""
    check_attention_impl(impl)
    if impl != "auto":
        return impl
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda", "rocm") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "blockwise" if frames > AUTO_BLOCKWISE_MIN_FRAMES else "xla"


def current_platform() -> str:
    """The platform of the mesh set with `jax.set_mesh` (the target of an AOT compile), else JAX's default."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return jax.default_backend() if device is None else device.platform


def sequence_attention(q, k, v, context: int | None, impl: str):
    """q, k, v [B, T, H, d] of one sequence each -> [B, T, H, d], by implementation `impl`."""
    impl = resolve_impl(impl, current_platform(), q.shape[-3], q.dtype)
    if impl == "xla":
        return full_attention(q, k, v, context)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, context)
    if impl == "splash":
        return splash_attention(q, k, v, context)
    return cudnn_attention(q, k, v, context)


def window_mask(query_positions, key_positions, context: int | None):
    """[Tq, Tk] visibility: key k is seen from query q iff 0 <= q - k < context; a key at position -1
    (an empty cache slot) is never seen."""
    delta = query_positions[:, None] - key_positions[None, :]
    mask = (key_positions >= 0)[None, :] & (delta >= 0)
    return mask & (delta < context) if context is not None else mask


def full_attention(q, k, v, context: int | None):
    """q, k, v [..., T, H, d] of one sequence -> [..., T, H, d]."""
    T, d = q.shape[-3], q.shape[-1]
    positions = jnp.arange(T)
    scores = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    scores = jnp.where(window_mask(positions, positions, context), scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("...hqk,...khd->...qhd", probs, v)


def attention_band(frames: int, context: int | None, block_frames: int = BLOCK_FRAMES) -> tuple[int, int, int]:
    """(block, query blocks, key blocks behind the diagonal one that a window can reach)."""
    reach = frames if context is None else min(context, frames)
    block = min(block_frames, 1 << max(reach - 1, 1).bit_length(), frames)
    blocks = -(-frames // block)
    return block, blocks, min(-(-(reach - 1) // block), blocks - 1)


def _blocked(x, block: int, blocks: int, front: int):
    """[B, T, H, d] -> [B, front + blocks, block, H, d]: zero-padded to whole blocks at the end and
    by `front` zero blocks at the start (the key blocks before the sequence)."""
    B, T, H, d = x.shape
    x = jnp.pad(x, ((0, 0), (front * block, blocks * block - T), (0, 0), (0, 0)))
    return x.reshape(B, front + blocks, block, H, d)


def _band_mask(offset, block: int, blocks: int, context: int | None):
    """[blocks, 1, block, block] visibility of key block i - offset from query block i."""
    within = jnp.arange(block)
    delta = offset * block + within[:, None] - within[None, :]
    seen = delta >= 0 if context is None else (delta >= 0) & (delta < context)
    exists = jnp.arange(blocks) >= offset
    return exists[:, None, None, None] & seen[None, None]


def _band_scores(q_blocks, keys, offset, block, blocks, context, scale):
    """Scores of every query block against `keys`, the key blocks `offset` behind, masked: [B, n, H, bq, bk]."""
    s = jnp.einsum("bnqhd,bnkhd->bnhqk", q_blocks, keys, preferred_element_type=jnp.float32) * scale
    return jnp.where(_band_mask(offset, block, blocks, context), s, -jnp.inf)


def _unblock(x, frames: int):
    """[B, n, block, H, d] -> [B, frames, H, d]."""
    B, n, block, H, d = x.shape
    return x.reshape(B, n * block, H, d)[:, :frames]


def _blockwise_forward(q, k, v, context, block_frames):
    B, T, H, d = q.shape
    block, blocks, behind = attention_band(T, context, block_frames)
    scale = 1 / math.sqrt(d)
    qb = _blocked(q, block, blocks, 0)
    kb, vb = _blocked(k, block, blocks, behind), _blocked(v, block, blocks, behind)

    def step(carry, offset):
        m, l, acc = carry
        keys = jax.lax.dynamic_slice_in_dim(kb, behind - offset, blocks, axis=1)
        values = jax.lax.dynamic_slice_in_dim(vb, behind - offset, blocks, axis=1)
        s = _band_scores(qb, keys, offset, block, blocks, context, scale)
        m_new = jnp.maximum(m, s.max(-1))  # finite from offset 0 on: every query sees itself
        p = jnp.exp(s - m_new[..., None])
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(-1)
        acc = acc * correction[..., None] + jnp.einsum("bnhqk,bnkhd->bnqhd", p.astype(v.dtype), values,
                                                       preferred_element_type=jnp.float32).swapaxes(2, 3)
        return (m_new, l, acc), None

    init = (jnp.full((B, blocks, H, block), -jnp.inf), jnp.zeros((B, blocks, H, block)),
            jnp.zeros((B, blocks, H, block, d)))
    (m, l, acc), _ = jax.lax.scan(step, init, jnp.arange(behind + 1))
    out = (acc / l[..., None]).swapaxes(2, 3)  # [B, n, block, H, d]
    return _unblock(out, T).astype(q.dtype), m + jnp.log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blockwise(q, k, v, context, block_frames):
    return _blockwise_forward(q, k, v, context, block_frames)[0]


def _blockwise_fwd(q, k, v, context, block_frames):
    out, lse = _blockwise_forward(q, k, v, context, block_frames)
    return out, (q, k, v, out, lse)


def _blockwise_bwd(context, block_frames, residuals, d_out):
    """Flash-attention backward over the same band: p from the saved log-sum-exp, dK/dV added into
    the key blocks each query block reached."""
    q, k, v, out, lse = residuals
    B, T, H, d = q.shape
    block, blocks, behind = attention_band(T, context, block_frames)
    scale = 1 / math.sqrt(d)
    qb, dob = _blocked(q, block, blocks, 0), _blocked(d_out, block, blocks, 0)
    kb, vb = _blocked(k, block, blocks, behind), _blocked(v, block, blocks, behind)
    delta = jnp.einsum("bnqhd,bnqhd->bnhq", dob.astype(jnp.float32), _blocked(out, block, blocks, 0).astype(jnp.float32))

    def add_at(total, part, start):
        return jax.lax.dynamic_update_slice_in_dim(
            total, jax.lax.dynamic_slice_in_dim(total, start, blocks, axis=1) + part, start, axis=1)

    def step(carry, offset):
        dq, dk, dv = carry
        start = behind - offset
        keys = jax.lax.dynamic_slice_in_dim(kb, start, blocks, axis=1)
        values = jax.lax.dynamic_slice_in_dim(vb, start, blocks, axis=1)
        s = _band_scores(qb, keys, offset, block, blocks, context, scale)
        p = jnp.exp(s - lse[..., None])  # masked scores are -inf: p = 0 there
        dv = add_at(dv, jnp.einsum("bnhqk,bnqhd->bnkhd", p, dob.astype(jnp.float32)), start)
        dp = jnp.einsum("bnqhd,bnkhd->bnhqk", dob, values, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bnhqk,bnkhd->bnqhd", ds, keys.astype(jnp.float32))
        dk = add_at(dk, jnp.einsum("bnhqk,bnqhd->bnkhd", ds, qb.astype(jnp.float32)), start)
        return (dq, dk, dv), None

    zeros_k = jnp.zeros(kb.shape, jnp.float32)
    init = (jnp.zeros(qb.shape, jnp.float32), zeros_k, zeros_k)
    (dq, dk, dv), _ = jax.lax.scan(step, init, jnp.arange(behind + 1))
    return (_unblock(dq, T).astype(q.dtype), _unblock(dk[:, behind:], T).astype(k.dtype),
            _unblock(dv[:, behind:], T).astype(v.dtype))


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(q, k, v, context: int | None, block_frames: int = BLOCK_FRAMES):
    """q, k, v [B, T, H, d] -> [B, T, H, d], exact windowed attention without a T x T array."""
    return _blockwise(q, k, v, context, block_frames)


def _splash_block(frames: int) -> int:
    """Splash's q/kv block: 512 frames (a multiple of the 128 lanes), or the padded sequence if shorter."""
    return min(512, -(-frames // 128) * 128)


def splash_attention(q, k, v, context: int | None, interpret: bool | None = None):
    """q, k, v [B, T, H, d] -> [B, T, H, d] by the Pallas splash kernel with a sliding-window mask.

    The sequence is zero-padded to whole blocks at the end (padded keys lie after every real query,
    so the causal window hides them). Under a mesh the kernel runs per device by shard_map, batch
    over the batch axes and heads over the tensor axis. `interpret` (default: off TPU) runs the same
    kernel in Pallas' interpreter.
    """
    B, T, H, d = q.shape
    if interpret is None:
        interpret = current_platform() != "tpu"
    block = _splash_block(T)
    padded = -(-T // block) * block
    shape = (padded, padded)
    window = splash_mask.CausalMask(shape) if context is None else \
        splash_mask.LocalMask(shape, window_size=(context - 1, 0), offset=0)
    sizes = splash_kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                     block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                     block_kv_dq=block)

    def local(q, k, v):  # one device's [b, padded, h, d]
        heads = q.shape[2]
        kernel = splash_kernel.make_splash_mha(splash_mask.MultiHeadMask([window] * heads), block_sizes=sizes,
                                               head_shards=1, q_seq_shards=1, interpret=interpret)
        out = jax.vmap(kernel)(*(jnp.swapaxes(a, 1, 2) for a in (q, k, v)))
        return jnp.swapaxes(out, 1, 2)

    pad = ((0, 0), (0, padded - T), (0, 0), (0, 0))
    q = (q.astype(jnp.float32) / math.sqrt(d)).astype(q.dtype)  # splash does not scale
    q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        spec = fit_spec(logical_to_spec(("batch", None, "heads", None)), q.shape,
                        dict(zip(mesh.axis_names, mesh.axis_sizes)))
        local = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    return local(q, k, v)[:, :T]


def cudnn_attention(q, k, v, context: int | None, implementation: str | None = "cudnn"):
    """q, k, v [B, T, H, d] -> [B, T, H, d] by cuDNN's fused attention with a causal local window
    (`implementation=None` lets JAX choose: its XLA path, for checking the window on CPU)."""
    window = None if context is None else (context - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window,
                                        implementation=implementation)


class KVCache(NamedTuple):
    """The ring cache of one attention layer: position p lives in slot p % capacity."""

    k: jax.Array  # [B*H, d, C]: keys transposed, so q.K is a plain matrix-vector product; batch and heads
    #               merged so that XLA updates the cache in place (with [B, H, ...] it copies the whole
    #               cache around the dot)
    v: jax.Array  # [B*H, C, d]

    @staticmethod
    def zeros(batch_size: int, num_heads: int, head_dim: int, capacity: int, dtype) -> "KVCache":
        BH = batch_size * num_heads
        return KVCache(jnp.zeros((BH, head_dim, capacity), dtype), jnp.zeros((BH, capacity, head_dim), dtype))

    @property
    def capacity(self) -> int:
        return self.v.shape[1]


def cache_positions(offset, capacity: int):
    """Absolute position held by each ring slot before a chunk starting at `offset` (-1: empty)."""
    slots = jnp.arange(capacity)
    last = offset - 1 - jnp.mod(offset - 1 - slots, capacity)
    return jnp.where(last >= 0, last, -1)


def _attend(q, mask, parts):
    """softmax over the keys of all parts at once; q [N, T, d], parts [(keys [N, d, S], values [N, S, d])]."""
    d = q.shape[-1]
    scores = jnp.concatenate([jnp.einsum("ntd,nds->nts", q, keys, preferred_element_type=jnp.float32)
                              for keys, _ in parts], axis=-1) / math.sqrt(d)
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    out, start = 0, 0
    for keys, values in parts:
        n = keys.shape[-1]
        out = out + jnp.einsum("nts,nsd->ntd", probs[..., start:start + n].astype(values.dtype), values)
        start += n
    return out


def _write(cache, new, offset, slot_axis: int):
    """Write a chunk's keys [N, d, T] (slot_axis 2) or values [N, T, d] (slot_axis 1) into the ring slots
    offset.. of a cache laid out the same way."""
    C, T = cache.shape[slot_axis], new.shape[slot_axis]
    n = min(T, C)  # a chunk longer than the ring keeps its last C frames
    new = jax.lax.slice_in_dim(new, T - n, T, axis=slot_axis).astype(cache.dtype)
    if n == 1:
        start = [0, 0, 0]
        start[slot_axis] = jnp.mod(offset + T - 1, C)
        return jax.lax.dynamic_update_slice(cache, new, start)
    slots = jnp.mod(offset + T - n + jnp.arange(n), C)
    index = (slice(None),) * slot_axis + (slots,)
    return cache.at[index].set(new, unique_indices=True)


def cached_attention(q, k, v, cache: KVCache, offset, context: int | None):
    """A chunk q, k, v [B, T, H, d] at positions offset.. over the cache and itself -> ([B, T, H, d], cache).

    One frame: written first, then attended over the ring (moshi's order; the slot it overwrites is
    outside the window). Longer chunks attend over the old ring plus their own keys in one softmax
    and are written after, so a chunk longer than the ring still sees every key its window needs.
    """
    B, T, H, d = q.shape
    C = cache.capacity
    q, k, v = (jnp.swapaxes(a, 1, 2).reshape(B * H, T, d) for a in (q, k, v))
    positions = offset + jnp.arange(T)
    k_t = jnp.swapaxes(k, 1, 2)  # [B*H, d, T]
    if T == 1:
        cache = KVCache(_write(cache.k, k_t, offset, 2), _write(cache.v, v, offset, 1))
        mask = window_mask(positions, cache_positions(offset + 1, C), context)
        out = _attend(q, mask, [cache])
    else:
        mask = jnp.concatenate([window_mask(positions, cache_positions(offset, C), context),
                                window_mask(positions, positions, context)], axis=1)
        out = _attend(q, mask, [cache, (k_t, v)])
        cache = KVCache(_write(cache.k, k_t, offset, 2), _write(cache.v, v, offset, 1))
    return jnp.swapaxes(out.reshape(B, H, T, d), 1, 2), cache
