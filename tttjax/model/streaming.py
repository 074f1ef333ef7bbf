"""Streaming inference: the LM frame by frame (or chunk by chunk) with carried state.

The temporal transformer keeps a ring KV cache of `context` frames per layer (moshi's
`RingKVCache`), and every TTT layer carries its inner state in primal form (`ttt.PrimalState`:
the weights at the start of the current mini-batch, the step-size-weighted gradient sums of the
tokens of that mini-batch already seen, and the position in it). The state commits at mini-batch
boundaries exactly as the dual form does, so a sequence fed in chunks of any size, one frame at
a time included, gives the logits of the full-sequence forward (`MoshiLM.__call__`).

The functions run on a `DecodeLM`: the model's weights rearranged for decoding (one array set per
temporal layer, per TTT layer and per depformer layer and codebook step) instead of `MoshiLM`'s
stacked parameters, because XLA copies a slice of a stacked parameter before using it: a frame
would copy every weight once more than it reads it. Layers are unrolled (the KV caches are one
array per layer, updated in place when the state is donated).

* `temporal_chunk(dm, state, x)`: embeddings [B, T, D] -> out-normed hidden [B, T, D].
* `forward_chunk(dm, state, codes_chunk)`: teacher-forced logits of T more frames of codes,
  aligned with the model steps (`ChunkOutput`); `chunked_forward` assembles them into the
  `LMOutput` of `MoshiLM(codes)`.
* `gen_step(dm, state, user_tokens, sampling)`: moshi's `LMGen.step`: one frame of user audio in,
  one frame of Moshi's stream (text + dep_q audio) out, the depformer sampling the dep_q
  codebooks autoregressively inside the step; `generate` runs it over a whole input.
`StreamingLM(model)` holds the jit-compiled versions (state donated).

The compatibility mode (`ttt.causal = False`) lets a frame read up to K-1 future frames of its
mini-batch; it cannot be computed before those frames exist, so everything here refuses it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tttjax.model.config import ModelConfig
from tttjax.model.moshi import (ZERO_TOKEN, LMOutput, MoshiLM, embed, embed_inputs, initial_tokens,
                                undelay_logits)
from tttjax.model.transformer import apply_rope, attention_mask, layer_at
from tttjax.model.ttt import (PrimalState, TTTToken, gelu_tanh, gelu_tanh_grad, inner_layer_norm, ln_l2_grad,
                              primal_step, step_sizes, _prepare)

UNGENERATED = -2  # moshi's ungenerated_token_id: frames LMGen has not produced yet


def check_streamable(cfg: ModelConfig) -> None:
    if cfg.ttt_layers and not cfg.ttt_causal:
        raise ValueError(
            "ttt.causal=False (the bidirectional compatibility mode) lets each frame read up to "
            f"mini_batch_size-1 = {cfg.ttt_mini_batch_size - 1} future frames of its TTT mini-batch, so its "
            "output cannot be computed frame by frame: streaming and chunked inference need a model with "
            "ttt.causal=True (use the full-sequence forward for this checkpoint)")


# ----------------------------------------------------------------------------------------------
# Weights arranged for decoding


class StepLinear(nnx.Module):
    """Weight set `step` of a per-step `lora.Linear`, as arrays of its own (same maths)."""

    def __init__(self, linear, step: int):
        self.dtype = linear.dtype
        self.lora_scaling = linear.lora_scaling
        self.kernel = nnx.Param(linear.kernel[...][step])
        has_lora = linear.lora_a is not None
        self.lora_a = nnx.Param(linear.lora_a[...][step]) if has_lora else None
        self.lora_b = nnx.Param(linear.lora_b[...][step]) if has_lora else None

    def __call__(self, x):
        x = x.astype(self.dtype)
        y = x @ self.kernel[...].astype(self.dtype)
        if self.lora_a is not None:
            a = x @ self.lora_a[...].astype(self.dtype)
            y = y + self.lora_scaling * (a @ self.lora_b[...].astype(self.dtype))
        return y


class DepformerLayerSteps(nnx.Module):
    """One depformer layer split by codebook step (norms shared, as in moshi)."""

    def __init__(self, layer, steps: int, context: int | None):
        self.norm1, self.norm2 = layer.norm1, layer.norm2
        self.num_heads = layer.self_attn.num_heads
        self.context = context
        split = lambda linear: nnx.List([StepLinear(linear, s) for s in range(steps)])  # noqa: E731
        self.in_proj, self.out_proj = split(layer.self_attn.in_proj), split(layer.self_attn.out_proj)
        self.linear_in, self.linear_out = split(layer.gating.linear_in), split(layer.gating.linear_out)

    def slot(self, x, cache: list, step: int):
        """Slot `step` of x [N, dd]; `cache` holds the (k, v) [N, H, d] of the earlier slots and gets this one."""
        N, D = x.shape
        H = self.num_heads
        d = D // H
        qkv = self.in_proj[step](self.norm1(x)).reshape(N, 3, H, d)
        cache.append((qkv[:, 1], qkv[:, 2]))
        first = 0 if self.context is None else max(0, step - self.context + 1)
        keys = jnp.stack([k for k, _ in cache[first:]], axis=1)  # [N, slots, H, d]
        values = jnp.stack([v for _, v in cache[first:]], axis=1)
        scores = jnp.einsum("nhd,nshd->nhs", qkv[:, 0], keys, preferred_element_type=jnp.float32) / math.sqrt(d)
        probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        attn = jnp.einsum("nhs,nshd->nhd", probs, values).reshape(N, D)
        x = x + self.out_proj[step](attn)
        gate, up = jnp.split(self.linear_in[step](self.norm2(x)), 2, axis=-1)
        return x + self.linear_out[step](jax.nn.silu(gate) * up)


class DecodeLM(nnx.Module):
    """`MoshiLM`'s parameters arranged for decoding (see the module docstring).

    Embeddings, out_norm and text_linear are shared with the model; the temporal, TTT and
    depformer layers are copies (one per layer / step), so holding both costs their memory twice.
    """

    def __init__(self, model: MoshiLM):
        cfg = model.cfg
        check_streamable(cfg)
        self.cfg = cfg
        self.emb, self.text_emb = model.emb, model.text_emb
        self.layers = nnx.List([layer_at(model.transformer, i) for i in range(cfg.num_layers)])
        self.ttt = nnx.List([layer_at(model.ttt, j) for j in range(len(cfg.ttt_layers))])
        self.out_norm, self.text_linear = model.out_norm, model.text_linear
        self.depformer_text_emb, self.depformer_emb = model.depformer_text_emb, model.depformer_emb
        S = cfg.dep_q
        self.depformer_in = nnx.List([StepLinear(model.depformer_in, s) for s in range(S)])
        self.linears = nnx.List([StepLinear(model.linears, s) for s in range(S)])
        self.depformer = nnx.List([DepformerLayerSteps(layer_at(model.depformer, i), S, cfg.depformer_context)
                                   for i in range(cfg.depformer_num_layers)])

    def initial_tokens(self):
        return initial_tokens(self.cfg)

    def embed_inputs(self, inputs):
        return embed_inputs(self.cfg, self.text_emb[...], self.emb, inputs)


def as_decode(model: MoshiLM | DecodeLM) -> DecodeLM:
    return model if isinstance(model, DecodeLM) else DecodeLM(model)


# ----------------------------------------------------------------------------------------------
# State


def cache_capacity(cfg: ModelConfig, max_frames: int | None) -> int:
    """Ring size: the attention window, or fewer slots if the caller never streams more frames."""
    if cfg.context is None:
        if max_frames is None:
            raise ValueError("the model has context=None (unbounded attention): pass max_frames, the most "
                             "frames that will be streamed, to size the KV cache")
        return int(max_frames)
    return int(cfg.context) if max_frames is None else int(min(cfg.context, max_frames))


class StreamState(NamedTuple):
    """Carried state of the temporal transformer (one offset for the whole batch)."""

    offset: jax.Array  # int32 []: frames (model steps) consumed so far
    k: tuple  # per temporal layer [B*H, d, C]: ring key cache (slot = position % C); keys transposed
    #           so q.K is a plain matrix-vector product, batch and heads merged so that XLA updates the
    #           cache in place (with [B, H, ...] it copies the whole cache around the dot)
    v: tuple  # per temporal layer [B*H, C, d]: ring value cache
    ttt: tuple  # per TTT layer a PrimalState with leaves [B, H, ...]: the inner state


def init_stream_state(model: MoshiLM | DecodeLM, batch_size: int, *, max_frames: int | None = None) -> StreamState:
    cfg = model.cfg
    check_streamable(cfg)
    C = cache_capacity(cfg, max_frames)
    BH, d = batch_size * cfg.num_heads, cfg.head_dim
    # Every leaf is a buffer of its own: the state is donated to the jitted step.
    ks = tuple(jnp.zeros((BH, d, C), cfg.jnp_dtype) for _ in range(cfg.num_layers))
    vs = tuple(jnp.zeros((BH, C, d), cfg.jnp_dtype) for _ in range(cfg.num_layers))
    ttt = []
    for j in range(len(cfg.ttt_layers)):
        if isinstance(model, DecodeLM):
            inner, pick = model.ttt[j].ttt, (lambda p: p[...])
        else:
            inner, pick = model.ttt.ttt, (lambda p, j=j: p[...][j])
        weights = [jnp.array(jnp.broadcast_to(pick(p).astype(inner.inner_dtype), (batch_size,) + pick(p).shape),
                             copy=True) for p in (inner.W1, inner.b1, inner.W2, inner.b2)]
        ttt.append(PrimalState(*weights, *(jnp.zeros_like(w) for w in weights),
                               jnp.zeros((batch_size, cfg.ttt_heads), jnp.int32)))
    return StreamState(jnp.zeros((), jnp.int32), ks, vs, tuple(ttt))


def frame_limit(cfg: ModelConfig, state: StreamState) -> int | None:
    """Frames a state can take in all: a ring smaller than the attention window must never wrap."""
    capacity = state.v[0].shape[1]
    return capacity if cfg.context is None or capacity < cfg.context else None


def cache_positions(offset, capacity: int):
    """Absolute position held by each ring slot before a chunk starting at `offset` (-1: empty)."""
    slots = jnp.arange(capacity)
    last = offset - 1 - jnp.mod(offset - 1 - slots, capacity)
    return jnp.where(last >= 0, last, -1)


# ----------------------------------------------------------------------------------------------
# Temporal transformer with a KV cache


def _project(attn, x, offset):
    """q, k, v [B, T, H, d] of a chunk at positions offset.. (RoPE applied, as `Attention`)."""
    B, T, D = x.shape
    H = attn.num_heads
    qkv = attn.in_proj(x).reshape(B, T, 3, H, D // H)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    if attn.rope_max_period is not None:
        positions = offset + jnp.arange(T)
        q = apply_rope(q, positions, attn.rope_max_period)
        k = apply_rope(k, positions, attn.rope_max_period)
    return q, k, v


def _window(query_positions, key_positions, context):
    delta = query_positions[:, None] - key_positions[None, :]
    mask = (key_positions >= 0)[None, :] & (delta >= 0)
    return mask & (delta < context) if context is not None else mask


def _softmax_attend(q, mask, parts):
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


def _layer_chunk(layer, x, k_cache, v_cache, offset, context, mid=None):
    """One temporal layer over a chunk x [B, T, D] with its ring caches (see `StreamState`).

    One frame: written first, then attended over the ring (moshi's order; the slot it overwrites is
    outside the window). Longer chunks attend over the old ring plus their own keys in one softmax
    and are written after, so a chunk longer than the ring still sees every key its window needs.
    """
    B, T, D = x.shape
    C = v_cache.shape[1]
    H = layer.self_attn.num_heads
    d = D // H
    # [B, T, H, d] -> [B*H, T, d]
    q, k, v = (jnp.swapaxes(a, 1, 2).reshape(B * H, T, d) for a in _project(layer.self_attn, layer.norm1(x), offset))
    positions = offset + jnp.arange(T)
    k_t = jnp.swapaxes(k, 1, 2)  # [B*H, d, T]
    if T == 1:
        k_cache, v_cache = _write(k_cache, k_t, offset, 2), _write(v_cache, v, offset, 1)
        mask = _window(positions, cache_positions(offset + 1, C), context)
        out = _softmax_attend(q, mask, [(k_cache, v_cache)])
    else:
        mask = jnp.concatenate([_window(positions, cache_positions(offset, C), context),
                                attention_mask(T, T, context)], axis=1)
        out = _softmax_attend(q, mask, [(k_cache, v_cache), (k_t, v)])
        k_cache, v_cache = _write(k_cache, k_t, offset, 2), _write(v_cache, v, offset, 1)
    out = jnp.swapaxes(out.reshape(B, H, T, d), 1, 2).reshape(B, T, D)
    x = x + layer.self_attn.out_proj(out)
    if mid is not None:
        x = mid(x)
    return x + layer.gating(layer.norm2(x)), k_cache, v_cache


def ttt_mlp_chunk(state: PrimalState, xq, xk, xv, lr, norm_w, norm_b, *, mini_batch_size: int, start):
    """Causal TTT-MLP of one head over a chunk of T tokens, continuing a carried primal state.

    The chunk's tokens are placed at slot `start` (= tokens of the current mini-batch already
    absorbed, dynamic) of a zero buffer aligned with the mini-batches, so the dual form runs on
    whole mini-batches: a query at slot i of a mini-batch uses
    W_start - (sum of carried lr*grad + sum_{j<=i} lr_j grad_j) / i, padding slots have lr = 0,
    and a mini-batch commits only if the chunk reaches its last slot. Returns (state, out [T, d]).
    """
    dt = state.w1.dtype
    K = mini_batch_size
    T, d = xq.shape
    xq, xk, xv, lr, norm_w, norm_b = (a.astype(dt) for a in (xq, xk, xv, lr, norm_w, norm_b))
    xq, xk, target = _prepare(xq, xk, xv, norm_w, norm_b)
    num = -(-(T + K - 1) // K)  # mini-batches the chunk can touch, whatever `start` is

    def place(a):
        buf = jnp.zeros((num * K,) + a.shape[1:], dt)
        return jax.lax.dynamic_update_slice_in_dim(buf, a, start, axis=0).reshape((num, K) + a.shape[1:])

    xq, xk, target, lr = (place(a) for a in (xq, xk, target, lr))
    e = step_sizes(lr, True)  # [num, K, K]: lr_j / i for j <= i
    m1 = e * (xq @ jnp.swapaxes(xk, -1, -2) + 1.0)
    rows = jnp.arange(1, K + 1, dtype=dt)[:, None]
    done = start + T >= (jnp.arange(num) + 1) * K  # the chunk fills this mini-batch's last slot

    def body(carry, mb):
        w1, b1, w2, b2, gw1, gb1, gw2, gb2 = carry
        q, k, tg, m1_, e_, lr_, done_ = mb
        z1 = k @ w1 + b1
        x2 = gelu_tanh(z1)
        g2 = ln_l2_grad(x2 @ w2 + b2, tg, norm_w, norm_b)
        g1 = (g2 @ w2.T) * gelu_tanh_grad(z1)
        z1b = q @ w1 + b1 - (q @ gw1 + gb1) / rows - m1_ @ g1
        x2b = gelu_tanh(z1b)
        z2b = x2b @ w2 + b2 - (x2b @ gw2 + gb2) / rows - (e_ * (x2b @ x2.T + 1.0)) @ g2
        u1, u2 = lr_[:, None] * g1, lr_[:, None] * g2
        acc = (gw1 + k.T @ u1, gb1 + jnp.sum(u1, 0, keepdims=True),
               gw2 + x2.T @ u2, gb2 + jnp.sum(u2, 0, keepdims=True))
        weights = tuple(jnp.where(done_, w - g / K, w) for w, g in zip((w1, b1, w2, b2), acc))
        grads = tuple(jnp.where(done_, jnp.zeros_like(g), g) for g in acc)
        return weights + grads, z2b

    carry, z2b = jax.lax.scan(body, tuple(state[:8]), (xq, xk, target, m1, e, lr, done))
    out = (xq + inner_layer_norm(z2b, norm_w, norm_b)).reshape(num * K, d)
    out = jax.lax.dynamic_slice_in_dim(out, start, T, axis=0)
    pos = jnp.mod(start + T, K).astype(state.pos.dtype)
    return PrimalState(*carry, jnp.broadcast_to(pos, state.pos.shape)), out


def ttt_block_chunk(block, h, state: PrimalState, offset):
    """The gated TTT branch (`TTTGatedBlock`) over a chunk h [B, T, D], carrying state [B, H, ...]."""
    m = block.ttt
    B, T, D = h.shape
    H, d, K = m.num_heads, m.head_dim, m.mini_batch_size
    xq, xk, xv = (proj(h).reshape(B, T, H, d) for proj in (m.wq, m.wk, m.wv))
    lr = m.inner_lr(h)  # [B, T, H]
    norm_w, norm_b = m.ttt_norm_weight[...], m.ttt_norm_bias[...]
    if T == 1:  # one frame: the primal step
        step = functools.partial(primal_step, mini_batch_size=K)
        heads = jax.vmap(step, in_axes=(0, TTTToken(0, 0, 0, 0), 0, 0))
        batch = jax.vmap(heads, in_axes=(0, TTTToken(0, 0, 0, 0), None, None))
        state, out = batch(state, TTTToken(xq[:, 0], xk[:, 0], xv[:, 0], lr[:, 0]), norm_w, norm_b)
        out = out[:, None]  # [B, 1, H, d]
    else:
        core = functools.partial(ttt_mlp_chunk, mini_batch_size=K, start=jnp.mod(offset, K))
        heads = jax.vmap(core, in_axes=(0, 1, 1, 1, 1, 0, 0), out_axes=(0, 1))
        batch = jax.vmap(heads, in_axes=(0, 0, 0, 0, 0, None, None), out_axes=(0, 0))
        state, out = batch(state, xq, xk, xv, lr, norm_w, norm_b)
    out = m.post_norm(out.reshape(B, T, D).astype(m.inner_dtype))
    y = m.wo(out.astype(m.dtype)).astype(m.dtype)
    dt = m.inner_dtype
    gate = jnp.tanh(block.gating_alpha[...].astype(dt))
    return (h.astype(dt) + gate * y.astype(dt)).astype(h.dtype), state


def temporal_chunk(dm: DecodeLM, state: StreamState, x):
    """Temporal transformer (+ out_norm) over embeddings x [B, T, D] continuing `state`."""
    cfg = dm.cfg
    offset = state.offset
    ks, vs, ttt = list(state.k), list(state.v), list(state.ttt)
    def ttt_mid(j):
        def mid(h):
            h, ttt[j] = ttt_block_chunk(dm.ttt[j], h, ttt[j], offset)
            return h

        return mid

    for i, layer in enumerate(dm.layers):
        mid = ttt_mid(cfg.ttt_layers.index(i)) if i in cfg.ttt_layers else None
        x, ks[i], vs[i] = _layer_chunk(layer, x, ks[i], vs[i], offset, cfg.context, mid)
    return StreamState(offset + x.shape[1], tuple(ks), tuple(vs), tuple(ttt)), dm.out_norm(x)


def depformer_run(dm: DecodeLM, h, first_token, choose: Callable):
    """The depformer over its dep_q slots for hidden states h [N, D] (out-normed), slot by slot.

    Slot s sees depformer_in[s](h) + the embedding of the previous slot's token (first_token [N],
    a text token, for slot 0); `choose(s, logits [N, card])` gives slot s's token (a sample when
    generating, the target when teacher forcing). Returns (logits [N, dep_q, card] fp32, tokens
    [N, dep_q])."""
    cfg = dm.cfg
    dtype = cfg.jnp_dtype
    prev = embed(dm.depformer_text_emb[...], first_token, dtype)
    caches = [[] for _ in dm.depformer]
    all_logits, tokens = [], []
    for s in range(cfg.dep_q):
        x = dm.depformer_in[s](h) + prev
        for layer, cache in zip(dm.depformer, caches):
            x = layer.slot(x, cache, s)
        logits = dm.linears[s](x).astype(jnp.float32)
        token = choose(s, logits)
        all_logits.append(logits)
        tokens.append(token)
        if s + 1 < cfg.dep_q:
            prev = embed(dm.depformer_emb[s], token, dtype)
    return jnp.stack(all_logits, axis=1), jnp.stack(tokens, axis=1)


# ----------------------------------------------------------------------------------------------
# Teacher-forced chunks


class ChunkState(NamedTuple):
    stream: StreamState
    history: jax.Array  # [B, K, max_delay + 1] int32: the code frames just before the next chunk


class ChunkOutput(NamedTuple):
    """Logits of the model steps of one chunk (step t sees frames < t, delayed, and predicts).

    Row k at step t predicts `targets[:, k, t]` = codes[k, t - delays[k]] (text: row 0 of the
    codes; audio row k: codes row 1 + k), i.e. these are `MoshiLM` logits *before* the undelay.
    The masks are False where the target is an initial token (t < delay) or -1.
    """

    text_logits: jax.Array  # [B, 1, T, text_card] fp32
    logits: jax.Array  # [B, dep_q, T, card] fp32
    text_mask: jax.Array  # [B, 1, T]
    mask: jax.Array  # [B, dep_q, T]
    text_targets: jax.Array  # [B, 1, T] int32
    targets: jax.Array  # [B, dep_q, T] int32


def init_chunk_state(model: MoshiLM | DecodeLM, batch_size: int, *, max_frames: int | None = None) -> ChunkState:
    cfg = model.cfg
    history = jnp.full((batch_size, cfg.num_codebooks, max(cfg.delays) + 1), ZERO_TOKEN, jnp.int32)
    return ChunkState(init_stream_state(model, batch_size, max_frames=max_frames), history)


def forward_chunk(model: MoshiLM | DecodeLM, state: ChunkState, codes_chunk) -> tuple[ChunkState, ChunkOutput]:
    """Teacher-forced logits of the next T frames of codes [B, K, T] (ids, -1 = no token).

    Feeding a sequence in chunks of any size (1 = the streaming path) gives exactly the steps of
    the full-sequence forward; `chunked_forward` undelays them into `MoshiLM`'s `LMOutput`.
    """
    dm = as_decode(model)
    cfg = dm.cfg
    B, K, T = codes_chunk.shape
    if K != cfg.num_codebooks:
        raise ValueError(f"codes have {K} streams, the model expects n_q + 1 = {cfg.num_codebooks}")
    M = max(cfg.delays)
    t0 = state.stream.offset
    ext = jnp.concatenate([state.history, codes_chunk.astype(jnp.int32)], axis=2)  # frame t0 - M - 1 + e
    steps = t0 + jnp.arange(T)
    initial = dm.initial_tokens()
    inputs, targets = [], []
    for k, d in enumerate(cfg.delays):
        inputs.append(jnp.where(steps - 1 - d >= 0, ext[:, k, M - d:M - d + T], initial[k]))
        targets.append(jnp.where(steps - d >= 0, ext[:, k, M + 1 - d:M + 1 - d + T], initial[k]))
    inputs, targets = jnp.stack(inputs, 1), jnp.stack(targets, 1)
    stream, h = temporal_chunk(dm, state.stream, dm.embed_inputs(inputs))
    text_logits = dm.text_linear(h)[:, None].astype(jnp.float32)
    flat = jnp.swapaxes(targets, 1, 2).reshape(B * T, K)  # [B*T, K]: the targets of each step
    logits, _ = depformer_run(dm, h.reshape(B * T, -1), flat[:, 0], lambda s, _: flat[:, 1 + s])
    logits = jnp.swapaxes(logits.reshape(B, T, cfg.dep_q, -1), 1, 2)
    delays = jnp.asarray(cfg.delays)
    valid = (steps[None, :] >= delays[:, None])[None] & (targets != ZERO_TOKEN)  # [B, K, T]
    out = ChunkOutput(text_logits, logits, valid[:, :1], valid[:, 1:1 + cfg.dep_q],
                      targets[:, :1], targets[:, 1:1 + cfg.dep_q])
    return ChunkState(stream, ext[:, :, T:]), out


# ----------------------------------------------------------------------------------------------
# Generation (moshi LMGen)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """moshi `LMGen` sampling options (defaults as LMGen's); hashable, a static jit argument."""

    use_sampling: bool = True
    temp: float = 0.8
    temp_text: float = 0.7
    top_k: int = 250
    top_k_text: int = 25


GREEDY = Sampling(use_sampling=False)


def sample_token(logits, key, *, use_sampling: bool, temp: float, top_k: int):
    """moshi `sample_token`: argmax, or a draw from softmax(logits / temp) restricted to the top_k
    most likely tokens (renormalised; top_k = 0 or >= vocabulary: all). logits [..., V] -> [...]."""
    if not use_sampling or temp <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temp
    if 0 < top_k < logits.shape[-1]:
        values, indices = jax.lax.top_k(logits, top_k)
        choice = jax.random.categorical(key, values, axis=-1)
        return jnp.take_along_axis(indices, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class GenState(NamedTuple):
    stream: StreamState
    tokens: jax.Array  # [B, K, max_delay + 2] int32: LMGen's token ring (-2 = not generated yet)
    key: jax.Array  # PRNG key; step t samples with fold_in(key, t)


def init_gen_state(model: MoshiLM | DecodeLM, batch_size: int, *, seed: int = 0,
                   max_frames: int | None = None) -> GenState:
    cfg = model.cfg
    tokens = jnp.full((batch_size, cfg.num_codebooks, max(cfg.delays) + 2), UNGENERATED, jnp.int32)
    return GenState(init_stream_state(model, batch_size, max_frames=max_frames), tokens, jax.random.key(seed))


def gen_step(model: MoshiLM | DecodeLM, state: GenState, user_tokens, sampling: Sampling = GREEDY):
    """moshi `LMGen.step` (with `support_out_of_sync` semantics): user audio tokens [B, n_q - dep_q] of
    this frame in; out [B, 1 + dep_q] = text + audio tokens of frame t - max_delay, all -2 while
    t < max_delay. The delays are applied as LMGen applies them: a stream's token enters the model
    once its delay has passed, and a frame is emitted when its most delayed token exists."""
    dm = as_decode(model)
    cfg = dm.cfg
    dq, M = cfg.dep_q, max(cfg.delays)
    CT = M + 2
    delays = jnp.asarray(cfg.delays)
    off = state.stream.offset
    tokens = state.tokens
    n_user = cfg.num_codebooks - 1 - dq
    if user_tokens.shape[-1] < n_user:
        raise ValueError(f"user tokens have {user_tokens.shape[-1]} codebooks, the model expects {n_user}")
    for i in range(n_user):
        row = 1 + dq + i
        tokens = tokens.at[:, row, jnp.mod(off + cfg.delays[row], CT)].set(user_tokens[:, i].astype(jnp.int32))
    current = tokens[:, :, jnp.mod(off, CT)]
    inputs = jnp.where(off <= delays[None, :], jnp.asarray(dm.initial_tokens())[None, :], current)
    stream, h = temporal_chunk(dm, state.stream, dm.embed_inputs(inputs[:, :, None]))
    h = h[:, 0]
    keys = jax.random.split(jax.random.fold_in(state.key, off), 1 + dq)
    text_token = sample_token(dm.text_linear(h).astype(jnp.float32), keys[0], use_sampling=sampling.use_sampling,
                              temp=sampling.temp_text, top_k=sampling.top_k_text)
    _, audio = depformer_run(dm, h, text_token, lambda s, logits: sample_token(
        logits, keys[1 + s], use_sampling=sampling.use_sampling, temp=sampling.temp, top_k=sampling.top_k))
    new_off = off + 1
    slot = jnp.mod(new_off, CT)
    tokens = tokens.at[:, 0, slot].set(text_token).at[:, 1:1 + dq, slot].set(audio)
    rows = jnp.arange(1 + dq)
    out = tokens[:, rows, jnp.mod(new_off - M + delays[:1 + dq], CT)]
    out = jnp.where(new_off <= M, UNGENERATED, out)
    return GenState(stream, tokens, state.key), out


# ----------------------------------------------------------------------------------------------
# Jitted drivers


class StreamingLM:
    """Jit-compiled streaming entry points of one model: its `DecodeLM` is built once and passed as
    arrays, and the state is donated (KV caches updated in place)."""

    def __init__(self, model: MoshiLM | DecodeLM):
        self.decode = as_decode(model)
        self.cfg = self.decode.cfg
        self.graphdef, self.params = nnx.split(self.decode)
        self._forward = jax.jit(self._forward_impl, donate_argnums=1)
        self._step = jax.jit(self._step_impl, donate_argnums=1, static_argnames="sampling")

    def _forward_impl(self, params, state, codes):
        return forward_chunk(nnx.merge(self.graphdef, params), state, codes)

    def _step_impl(self, params, state, user_tokens, sampling):
        return gen_step(nnx.merge(self.graphdef, params), state, user_tokens, sampling)

    def init_chunk_state(self, batch_size: int, *, max_frames: int | None = None) -> ChunkState:
        return init_chunk_state(self.decode, batch_size, max_frames=max_frames)

    def init_gen_state(self, batch_size: int, *, seed: int = 0, max_frames: int | None = None) -> GenState:
        return init_gen_state(self.decode, batch_size, seed=seed, max_frames=max_frames)

    def _check_room(self, stream: StreamState, frames: int) -> None:
        limit = frame_limit(self.cfg, stream)  # only then is the offset read back (a device sync)
        if limit is not None and int(stream.offset) + frames > limit:
            raise ValueError(f"the KV cache was sized for max_frames={limit} frames (fewer than the attention "
                             f"context); {int(stream.offset) + frames} requested")

    def forward_chunk(self, state: ChunkState, codes_chunk, *, check: bool = True) -> tuple[ChunkState, ChunkOutput]:
        """`forward_chunk`, compiled once per chunk shape; the state passed in is consumed (donated)."""
        if check:
            self._check_room(state.stream, codes_chunk.shape[-1])
        return self._forward(self.params, state, jnp.asarray(codes_chunk, jnp.int32))

    def step(self, state: GenState, user_tokens, sampling: Sampling = GREEDY, *, check: bool = True):
        """`gen_step`, compiled once per `sampling`; the state passed in is consumed (donated)."""
        if check:
            self._check_room(state.stream, 1)
        return self._step(self.params, state, jnp.asarray(user_tokens, jnp.int32), sampling=sampling)


def _streamer(model) -> StreamingLM:
    return model if isinstance(model, StreamingLM) else StreamingLM(model)


def iter_chunks(streamer: StreamingLM, codes, chunk_size: int):
    """Feed codes [B, K, T] chunk by chunk; yields (first step, number of real steps, ChunkOutput).
    The last chunk is right-padded with -1 frames (causal: earlier steps do not see them)."""
    codes = np.asarray(codes)
    B, K, T = codes.shape
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    padded = -(-T // chunk_size) * chunk_size
    codes = np.concatenate([codes, np.full((B, K, padded - T), ZERO_TOKEN, codes.dtype)], axis=2)
    state = streamer.init_chunk_state(B, max_frames=padded)
    for start in range(0, T, chunk_size):
        state, out = streamer.forward_chunk(state, codes[:, :, start:start + chunk_size], check=False)
        yield start, min(chunk_size, T - start), out


def chunked_forward(model: MoshiLM | DecodeLM | StreamingLM, codes, chunk_size: int = 1) -> LMOutput:
    """`MoshiLM(codes)` computed chunk by chunk through the carried state (chunk_size=1: frame by frame)."""
    streamer = _streamer(model)
    cfg = streamer.cfg
    codes = np.asarray(codes)
    parts = [jax.tree.map(lambda a: np.asarray(a)[:, :, :n], out) for _, n, out in
             iter_chunks(streamer, codes, chunk_size)]
    text_logits = np.concatenate([p.text_logits for p in parts], axis=2)
    logits = np.concatenate([p.logits for p in parts], axis=2)
    logits, mask = undelay_logits(jnp.asarray(logits), cfg.delays[1:1 + cfg.dep_q])
    text_logits, text_mask = undelay_logits(jnp.asarray(text_logits), cfg.delays[:1])
    mask &= jnp.asarray(codes[:, 1:1 + cfg.dep_q] != ZERO_TOKEN)
    text_mask &= jnp.asarray(codes[:, :1] != ZERO_TOKEN)
    return LMOutput(text_logits, logits, text_mask, mask)


def generate(model: MoshiLM | DecodeLM | StreamingLM, user_codes, *, sampling: Sampling = GREEDY, seed: int = 0,
             on_step=None) -> np.ndarray:
    """Run `gen_step` over user audio codes [B, n_q - dep_q, T]: Moshi's stream [B, 1 + dep_q, T], frame t
    being what `LMGen.step` returns for input frame t (-2 for the first max_delay frames, where LMGen
    returns None)."""
    streamer = _streamer(model)
    user_codes = np.asarray(user_codes)
    B, _, T = user_codes.shape
    state = streamer.init_gen_state(B, seed=seed, max_frames=T)
    outs = []
    for t in range(T):
        state, out = streamer.step(state, user_codes[:, :, t], sampling, check=False)  # T <= max_frames
        outs.append(out)
        if on_step is not None:
            on_step(t, out)
    return np.stack([np.asarray(o) for o in outs], axis=2)
