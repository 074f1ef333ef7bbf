"""Streaming inference: the LM frame by frame (or chunk by chunk) with carried state.

The model's own layers run here with their optional carried state (`transformer.LayerCache`):
each temporal layer keeps a ring KV cache of `context` frames (moshi's `RingKVCache`), and every
TTT layer carries its inner state (`ttt.PrimalState`: the weights at the start of the current
mini-batch, the step-size-weighted gradient sums of the tokens of that mini-batch already seen,
and the position in it). The state commits at mini-batch boundaries exactly as the dual form
does, so a sequence fed in chunks of any size, one frame at a time included, gives the logits of
the full-sequence forward (`MoshiLM.__call__`). This module holds only that state and the drivers.

The drivers run on a `DecodeLM`: the model plus views of its stacked parameters as one array set
per temporal layer, per TTT layer and per depformer layer and codebook step, made once before
decoding, because XLA copies a slice of a stacked parameter before using it: a frame would copy
every weight once more than it reads it. Layers are unrolled (one KV cache array per layer,
updated in place when the state is donated).

* `temporal_chunk(dm, state, x)`: embeddings [B, T, D] -> out-normed hidden [B, T, D].
* `forward_chunk(dm, state, codes_chunk)`: teacher-forced logits of T more frames of codes,
  aligned with the model steps (`ChunkOutput`); `iter_chunks` feeds a whole array, and
  `chunked_forward` assembles the chunks into the `LMOutput` of `MoshiLM(codes)`.
* `gen_step(dm, state, user_tokens, sampling)`: moshi's `LMGen.step`: one frame of user audio in,
  one frame of Moshi's stream (text + dep_q audio) out, the depformer sampling the dep_q
  codebooks autoregressively inside the step; `generate` runs it over a whole input.
`StreamingLM(model)` holds the jit-compiled versions (state donated).

The compatibility mode (`ttt.causal = False`) lets a frame read up to K-1 future frames of its
mini-batch; it cannot be computed before those frames exist, so everything here refuses it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tttjax.errors import UserError
from tttjax.model.attention import KVCache
from tttjax.model.config import ModelConfig
from tttjax.model.moshi import (
    ZERO_TOKEN,
    LMOutput,
    MoshiLM,
    embed,
    initial_tokens,
    undelay_logits,
)
from tttjax.model.transformer import LayerCache, layer_at

UNGENERATED = -2  # moshi's ungenerated_token_id: frames LMGen has not produced yet


def check_streamable(cfg: ModelConfig) -> None:
    if cfg.ttt_layers and not cfg.ttt_causal:
        raise UserError(
            "ttt.causal=False (the bidirectional compatibility mode) lets each frame read up to "
            f"mini_batch_size-1 = {cfg.ttt_mini_batch_size - 1} future frames of its TTT mini-batch, so its "
            "output cannot be computed frame by frame: streaming and chunked inference need a model with "
            "ttt.causal=True (use the full-sequence forward for this checkpoint)")


class DecodeLM(nnx.Module):
    """A `MoshiLM` with its layer stacks as per-layer (and, in the depformer, per-step) views.

    `model` keeps the embeddings and heads and drops its stacks, so a decode step is not passed
    arrays it does not read. The views hold copies of their slices: holding a DecodeLM beside the
    model costs the layers' memory twice (the depformer's three times: per layer for teacher-forced
    chunks, per layer and step for sampling).
    """

    def __init__(self, model: MoshiLM):
        cfg = model.cfg
        check_streamable(cfg)
        self.cfg = cfg
        self.layers = nnx.List([layer_at(model.transformer, i) for i in range(cfg.num_layers)])
        self.ttt = nnx.List([layer_at(model.ttt, j) for j in range(len(cfg.ttt_layers))])
        S = cfg.dep_q
        self.depformer_in = nnx.List([model.depformer_in.at_step(s) for s in range(S)])
        self.linears = nnx.List([model.linears.at_step(s) for s in range(S)])
        self.depformer_layers = nnx.List([layer_at(model.depformer, i) for i in range(cfg.depformer_num_layers)])
        self.depformer = nnx.List([nnx.List([layer.at_step(s) for layer in self.depformer_layers]) for s in range(S)])
        self.model = nnx.merge(*nnx.split(model))  # the same arrays, without the stacks
        self.model.transformer = self.model.ttt = self.model.depformer = None


def as_decode(model: MoshiLM | DecodeLM) -> DecodeLM:
    return model if isinstance(model, DecodeLM) else DecodeLM(model)


# ----------------------------------------------------------------------------------------------
# State


def cache_capacity(cfg: ModelConfig, max_frames: int | None) -> int:
    """Ring size: the attention window, or fewer slots if the caller never streams more frames."""
    if cfg.context is None:
        if max_frames is None:
            raise UserError("the model has context=None (unbounded attention): pass max_frames, the most "
                             "frames that will be streamed, to size the KV cache")
        return int(max_frames)
    return int(cfg.context) if max_frames is None else int(min(cfg.context, max_frames))


class StreamState(NamedTuple):
    """Carried state of the temporal transformer (one offset for the whole batch)."""

    offset: jax.Array  # int32 []: frames (model steps) consumed so far
    layers: tuple  # per temporal layer a LayerCache: its KV ring, and its TTT state in a TTT layer

    @property
    def ttt(self) -> tuple:
        """The TTT states, one per TTT layer (leaves [B, H, ...])."""
        return tuple(c.ttt for c in self.layers if c.ttt is not None)


def init_stream_state(model: MoshiLM | DecodeLM, batch_size: int, *, max_frames: int | None = None) -> StreamState:
    cfg = model.cfg
    check_streamable(cfg)
    capacity = cache_capacity(cfg, max_frames)
    ttt = model.ttt if isinstance(model, DecodeLM) else [layer_at(model.ttt, j) for j in range(len(cfg.ttt_layers))]
    layers = []
    for i in range(cfg.num_layers):  # every leaf a buffer of its own: the state is donated to the jitted step
        kv = KVCache.zeros(batch_size, cfg.num_heads, cfg.head_dim, capacity, cfg.jnp_dtype)
        state = ttt[cfg.ttt_layers.index(i)].ttt.init_state(batch_size) if i in cfg.ttt_layers else None
        layers.append(LayerCache(kv, state))
    return StreamState(jnp.zeros((), jnp.int32), tuple(layers))


def frame_limit(cfg: ModelConfig, state: StreamState) -> int | None:
    """Frames a state can take in all: a ring smaller than the attention window must never wrap."""
    capacity = state.layers[0].kv.capacity
    return capacity if cfg.context is None or capacity < cfg.context else None


# ----------------------------------------------------------------------------------------------
# The model with carried state


def temporal_chunk(dm: DecodeLM, state: StreamState, x):
    """Temporal transformer (+ out_norm) over embeddings x [B, T, D] continuing `state`."""
    cfg = dm.cfg
    layers = list(state.layers)
    for i, layer in enumerate(dm.layers):
        ttt = dm.ttt[cfg.ttt_layers.index(i)] if i in cfg.ttt_layers else None
        x, layers[i] = layer(x, ttt=ttt, offset=state.offset, cache=layers[i])
    return StreamState(state.offset + x.shape[1], tuple(layers)), dm.model.out_norm(x)


def depformer_sample(dm: DecodeLM, h, first_token, choose: Callable):
    """The depformer over its dep_q slots for hidden states h [N, D] (out-normed), slot by slot.

    Slot s sees depformer_in[s](h) + the embedding of the previous slot's token (first_token [N],
    a text token, for slot 0) and attends over the earlier slots (a KV cache per layer);
    `choose(s, logits [N, card])` gives slot s's token. Returns the tokens [N, dep_q]."""
    cfg, model = dm.cfg, dm.model
    dtype = cfg.jnp_dtype
    N = h.shape[0]
    capacity = min(cfg.depformer_context or cfg.dep_q, cfg.dep_q)
    head_dim = cfg.depformer_dim // cfg.depformer_num_heads
    caches = [LayerCache(KVCache.zeros(N, cfg.depformer_num_heads, head_dim, capacity, dtype), None)
              for _ in range(cfg.depformer_num_layers)]
    prev = embed(model.depformer_text_emb[...], first_token, dtype)
    tokens = []
    for s in range(cfg.dep_q):
        x = (dm.depformer_in[s](h) + prev)[:, None]  # [N, 1, dd]: one step of a stream over the slots
        for i, layer in enumerate(dm.depformer[s]):
            x, caches[i] = layer(x, offset=s, cache=caches[i])
        token = choose(s, dm.linears[s](x[:, 0]).astype(jnp.float32))
        tokens.append(token)
        if s + 1 < cfg.dep_q:
            prev = embed(model.depformer_emb[s], token, dtype)
    return jnp.stack(tokens, axis=1)


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
    model, cfg = dm.model, dm.cfg
    B, K, T = codes_chunk.shape
    if K != cfg.num_codebooks:
        raise UserError(f"codes have {K} streams, the model expects n_q + 1 = {cfg.num_codebooks}")
    M = max(cfg.delays)
    t0 = state.stream.offset
    ext = jnp.concatenate([state.history, codes_chunk.astype(jnp.int32)], axis=2)  # frame t0 - M - 1 + e
    steps = t0 + jnp.arange(T)
    initial = initial_tokens(cfg)
    inputs, targets = [], []
    for k, d in enumerate(cfg.delays):
        inputs.append(jnp.where(steps - 1 - d >= 0, ext[:, k, M - d:M - d + T], initial[k]))
        targets.append(jnp.where(steps - d >= 0, ext[:, k, M + 1 - d:M + 1 - d + T], initial[k]))
    inputs, targets = jnp.stack(inputs, 1), jnp.stack(targets, 1)
    stream, h = temporal_chunk(dm, state.stream, model.embed_inputs(inputs))
    text_logits = model.text_linear(h)[:, None].astype(jnp.float32)
    # Teacher forcing needs no slot-by-slot depformer: the training path runs every slot at once.
    logits = jnp.swapaxes(model.depformer_logits(h, targets, dm.depformer_layers), 0, 1).astype(jnp.float32)
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
        raise UserError(f"user tokens have {user_tokens.shape[-1]} codebooks, the model expects {n_user}")
    for i in range(n_user):
        row = 1 + dq + i
        tokens = tokens.at[:, row, jnp.mod(off + cfg.delays[row], CT)].set(user_tokens[:, i].astype(jnp.int32))
    current = tokens[:, :, jnp.mod(off, CT)]
    inputs = jnp.where(off <= delays[None, :], jnp.asarray(initial_tokens(cfg))[None, :], current)
    stream, h = temporal_chunk(dm, state.stream, dm.model.embed_inputs(inputs[:, :, None]))
    h = h[:, 0]
    keys = jax.random.split(jax.random.fold_in(state.key, off), 1 + dq)
    text_token = sample_token(dm.model.text_linear(h).astype(jnp.float32), keys[0],
                              use_sampling=sampling.use_sampling, temp=sampling.temp_text, top_k=sampling.top_k_text)
    audio = depformer_sample(dm, h, text_token, lambda s, logits: sample_token(
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
            raise UserError(f"the KV cache was sized for max_frames={limit} frames (fewer than the attention "
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
        raise UserError(f"chunk_size={chunk_size} must be >= 1")
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
