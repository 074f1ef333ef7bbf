"""The Moshi LM (temporal transformer + depformer) with optional TTT layers, as `moshi.models.lm.LMModel`.

`MoshiLM(codes)` mirrors `LMModel.forward`: codes [B, 17, T] (ids, -1 = no token) in, logits
aligned with the codes out (no extra shift), NaN on the delayed tail, masks false there and
where the target is -1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tttjax.errors import UserError
from tttjax.model.config import ModelConfig
from tttjax.model.lora import Linear
from tttjax.model.transformer import (
    RMSNorm,
    TransformerLayer,
    apply_layer,
    create_stacked,
    layer_at,
    scan_layers,
)
from tttjax.model.ttt import TTTGatedBlock
from tttjax.parallel.sharding import constrain

ZERO_TOKEN = -1


class LMOutput(NamedTuple):
    text_logits: jax.Array  # [B, 1, T, text_card]
    logits: jax.Array  # [B, dep_q, T, card]
    text_mask: jax.Array  # [B, 1, T]
    mask: jax.Array  # [B, dep_q, T]


class Predictions(NamedTuple):
    """Logits with the token each predicts, in the model's own (delayed) frame: what the loss needs.

    Sums over tokens do not depend on the frame, and undelaying the logits would cost two full
    copies and NaN masking in every training step.
    """
    text_logits: jax.Array  # [B, T, text_card]
    text_targets: jax.Array  # [B, T]
    text_mask: jax.Array  # [B, T]
    logits: jax.Array  # [dep_q, B, T, card]
    targets: jax.Array  # [dep_q, B, T]
    mask: jax.Array  # [dep_q, B, T]


def embed(table, ids, dtype):
    """moshi ScaledEmbedding: id -1 gives an exact zero vector."""
    table = constrain(table, (None,) * table.ndim)  # FSDP: gather the table, then look up batch-sharded ids
    out = jnp.take(table, jnp.maximum(ids, 0), axis=0).astype(dtype)
    return jnp.where((ids == ZERO_TOKEN)[..., None], jnp.zeros((), dtype), out)


def initial_tokens(cfg: ModelConfig) -> list[int]:
    """The token each stream starts from: text_card for text, card for every audio stream."""
    return [cfg.text_card] + [cfg.card] * cfg.n_q


def embed_stacked(tables, ids, dtype):
    """`embed(tables[k], ids[:, k])` for every k at once -> [B, K, ..., D]: one gather from the
    flattened stack, so the gradient is one scatter rather than K full-size padded ones."""
    K, rows, D = tables.shape
    offsets = (jnp.arange(K) * rows).reshape((1, K) + (1,) * (ids.ndim - 2))
    return embed(tables.reshape(K * rows, D), jnp.where(ids == ZERO_TOKEN, ZERO_TOKEN, ids + offsets), dtype)


def embed_inputs(cfg: ModelConfig, text_emb, emb, inputs):
    """Temporal input: text_emb(row 0) + sum_k emb[k](row 1+k), rows of `inputs` [B, 17, T]."""
    dtype = cfg.jnp_dtype
    x = embed(text_emb, inputs[:, 0], dtype)
    audio = embed_stacked(emb[...], inputs[:, 1:1 + cfg.n_q], dtype)
    for k in range(cfg.n_q):
        x = x + audio[:, k]
    return x


def delay_codes(codes, delays, initial):
    """Delay stream k by delays[k] (the first steps get its initial token), then prepend the initial column."""
    B, K, T = codes.shape
    t = jnp.arange(T)
    rows = []
    for k, d in enumerate(delays):
        shifted = jnp.roll(codes[:, k], d, axis=-1)
        rows.append(jnp.where(t < d, initial[k], shifted))
    delayed = jnp.stack(rows, axis=1)
    return jnp.concatenate([jnp.broadcast_to(jnp.asarray(initial)[None, :, None], (B, K, 1)), delayed], axis=2)


def undelay_logits(logits, delays):
    """Shift stream k back by delays[k]; the last delays[k] steps become NaN with mask False."""
    B, K, T = logits.shape[:3]
    t = jnp.arange(T)
    out, masks = [], []
    for k, d in enumerate(delays):
        valid = t < T - d
        out.append(jnp.where(valid[:, None], jnp.roll(logits[:, k], -d, axis=1), jnp.nan))
        masks.append(jnp.broadcast_to(valid, (B, T)))
    return jnp.stack(out, axis=1), jnp.stack(masks, axis=1)


def temporal_segments(num_layers: int, ttt_layers: tuple[int, ...]):
    """Split the temporal stack into runs of plain layers and single TTT layers.

    Returns [(start, stop, ttt_index or None)]; plain runs are scanned, TTT layers run alone.
    """
    segments, start = [], 0
    for j, layer in enumerate(ttt_layers):
        if layer > start:
            segments.append((start, layer, None))
        segments.append((layer, layer + 1, j))
        start = layer + 1
    if start < num_layers:
        segments.append((start, num_layers, None))
    return segments


class MoshiLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt, dt = cfg.jnp_param_dtype, cfg.jnp_dtype
        lora = dict(lora_rank=cfg.lora_rank, lora_scaling=cfg.lora_scaling)
        emb_init = nnx.initializers.normal(1.0)  # torch nn.Embedding default
        self.emb = nnx.Param(emb_init(rngs.params(), (cfg.n_q, cfg.card + 1, cfg.dim), pdt),
                             out_sharding=(None, "vocab", "embed"))
        self.text_emb = nnx.Param(emb_init(rngs.params(), (cfg.text_card + 1, cfg.dim), pdt),
                                  out_sharding=("vocab", "embed"))
        self.transformer = create_stacked(cfg.num_layers, lambda r: TransformerLayer(
            cfg.dim, cfg.num_heads, cfg.hidden, context=cfg.context, rope_max_period=cfg.max_period,
            steps=None, param_dtype=pdt, dtype=dt, rngs=r, attention_impl=cfg.attention_impl, **lora), rngs)
        if cfg.ttt_layers:
            self.ttt = create_stacked(len(cfg.ttt_layers), lambda r: TTTGatedBlock(
                cfg.dim, cfg.ttt_heads, initial_gating_alpha=cfg.ttt_initial_gating_alpha,
                mini_batch_size=cfg.ttt_mini_batch_size, base_lr=cfg.ttt_base_lr, causal=cfg.ttt_causal,
                scan_remat_group=cfg.ttt_scan_remat_group, param_dtype=pdt, dtype=dt, rngs=r), rngs)
        else:
            self.ttt = None
        self.out_norm = RMSNorm(cfg.dim, param_dtype=pdt)
        self.text_linear = Linear(cfg.dim, cfg.text_card, axes=("embed", "vocab"),
                                  param_dtype=pdt, dtype=dt, rngs=rngs, **lora)
        S, dd = cfg.dep_q, cfg.depformer_dim
        self.depformer_in = Linear(cfg.dim, dd, axes=("embed", "dep_embed"), steps=S, broadcast_input=True,
                                   param_dtype=pdt, dtype=dt, rngs=rngs, **lora)
        self.depformer_text_emb = nnx.Param(emb_init(rngs.params(), (cfg.text_card + 1, dd), pdt),
                                            out_sharding=("vocab", "embed"))
        self.depformer_emb = nnx.Param(emb_init(rngs.params(), (S - 1, cfg.card + 1, dd), pdt),
                                       out_sharding=(None, "vocab", "embed"))
        self.depformer = create_stacked(cfg.depformer_num_layers, lambda r: TransformerLayer(
            dd, cfg.depformer_num_heads, cfg.depformer_hidden, context=cfg.depformer_context,
            rope_max_period=None, steps=S, param_dtype=pdt, dtype=dt, rngs=r,
            attention_impl="xla", **lora), rngs)  # the depformer attends over its 8 slots: full scores
        self.linears = Linear(dd, cfg.card, axes=("embed", "vocab"), steps=S,
                              param_dtype=pdt, dtype=dt, rngs=rngs, **lora)

    def initial_tokens(self):
        return initial_tokens(self.cfg)

    def embed_inputs(self, inputs):
        return embed_inputs(self.cfg, self.text_emb[...], self.emb, inputs)

    def temporal(self, x):
        """The temporal transformer with TTT branches at cfg.ttt_layers, then out_norm."""
        for start, stop, ttt_index in temporal_segments(self.cfg.num_layers, self.cfg.ttt_layers):
            if ttt_index is None:
                x = scan_layers(self.transformer, x, start, stop, self.cfg.remat, self.cfg.unroll_layers)
            else:
                x = apply_layer(layer_at(self.transformer, start), x, ttt=layer_at(self.ttt, ttt_index),
                                remat=self.cfg.remat)
                x = constrain(x, ("batch", None, None))
        return self.out_norm(x)

    def depformer_logits(self, h, targets, layers=None):
        """Teacher-forced depformer: slot k sees depformer_in[k](h) + embedding of stream k-1.

        `layers`: the depformer's layers as separate modules (decoding's views), run one after the
        other instead of the scan over the stack, whose per-layer slices XLA copies at every call.
        """
        B, T, _ = h.shape
        dtype = self.cfg.jnp_dtype
        text = embed(self.depformer_text_emb[...], targets[:, :1], dtype)  # [B, 1, T, dd]
        audio = embed_stacked(self.depformer_emb[...], targets[:, 1:self.cfg.dep_q], dtype)  # [B, S-1, T, dd]
        tokens = jnp.concatenate([text, audio], axis=1).transpose(1, 0, 2, 3)  # [S, B, T, dd]
        # Steps-major ([S, B * T, dd]): every per-step projection is a plain batched matmul.
        x = (self.depformer_in(h) + tokens).reshape(self.cfg.dep_q, B * T, -1)
        if layers is None:
            x = scan_layers(self.depformer, constrain(x, (None, "batch", None)), 0, self.cfg.depformer_num_layers,
                            self.cfg.remat, self.cfg.unroll_layers, batch_axis=1)
        else:
            for layer in layers:
                x = layer(x)[0]
        return self.linears(x).reshape(self.cfg.dep_q, B, T, -1)

    def _delayed_logits(self, codes):
        """(targets [B, K, T] in the delayed frame, text logits [B, T, V], audio logits [dep_q, B, T, V])."""
        cfg = self.cfg
        K = codes.shape[1]
        if K != cfg.num_codebooks:
            raise UserError(f"codes have {K} streams, the model expects n_q + 1 = {cfg.num_codebooks}")
        delayed = delay_codes(codes, cfg.delays, self.initial_tokens())
        h = self.temporal(constrain(self.embed_inputs(delayed[:, :, :-1]), ("batch", None, None)))
        return delayed[:, :, 1:], self.text_linear(h), self.depformer_logits(h, delayed[:, :, 1:])

    def predictions(self, codes) -> Predictions:
        """The training view of `__call__`: the same (logit, target) pairs, none of the NaN tail."""
        cfg = self.cfg
        targets, text_logits, logits = self._delayed_logits(codes)
        targets = jnp.transpose(targets[:, :1 + cfg.dep_q], (1, 0, 2))  # [1 + dep_q, B, T]
        delays = jnp.asarray(cfg.delays[:1 + cfg.dep_q])[:, None, None]
        mask = (jnp.arange(codes.shape[-1]) >= delays) & (targets != ZERO_TOKEN)
        return Predictions(text_logits, targets[0], mask[0], logits, targets[1:], mask[1:])

    def __call__(self, codes) -> LMOutput:
        cfg = self.cfg
        _, text_logits, logits = self._delayed_logits(codes)
        text_logits = text_logits[:, None].astype(jnp.float32)
        logits = jnp.transpose(logits, (1, 0, 2, 3)).astype(jnp.float32)
        logits, mask = undelay_logits(logits, cfg.delays[1:1 + cfg.dep_q])
        text_logits, text_mask = undelay_logits(text_logits, cfg.delays[:1])
        mask &= codes[:, 1:1 + cfg.dep_q] != ZERO_TOKEN
        text_mask &= codes[:, :1] != ZERO_TOKEN
        return LMOutput(text_logits, logits, text_mask, mask)


def create_model(cfg: ModelConfig, seed: int = 0) -> MoshiLM:
    """Build a randomly initialised model (sharding names kept as metadata, not applied eagerly)."""
    with nnx.use_eager_sharding(False):
        return MoshiLM(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig) -> MoshiLM:
    """Shapes and dtypes only (nothing allocated): for parameter counts and restore targets."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: MoshiLM(cfg, rngs=nnx.Rngs(0)))
