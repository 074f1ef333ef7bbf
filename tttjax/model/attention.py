"""Attention over q, k, v (no parameters): moshi's causal window, full-sequence and with a ring KV cache.

Window (moshi's `context`): the key at position k is visible from the query at position q iff
0 <= q - k < context (context None: every earlier key). Scores and softmax in fp32.

* `full_attention`: every query of a sequence over the keys of the same sequence (training, the
  teacher-forced forward).
* `cached_attention`: a chunk of T >= 1 queries at positions offset.. over a ring cache of earlier
  keys (moshi's `RingKVCache`) plus the chunk's own; the chunk is written into the ring. Decoding
  (T = 1) and chunked evaluation run it; both give the full forward's values.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


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
