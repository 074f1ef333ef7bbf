"""moshi-finetune's objective: weighted text CE + weighted audio CE, each a mean over its own tokens.

Text targets equal to the pad ids {3, 0} weigh `text_padding_weight`; audio codebook 0 (semantic)
weighs `first_codebook_weight_multiplier`. The loss reads `MoshiLM.predictions` (the delayed
frame): the same (logit, target) pairs as moshi's undelayed output, without its NaN tail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tttjax.model.moshi import Predictions


def token_cross_entropy(logits, targets, mask):
    """Per-token natural-log CE in fp32, 0 where mask is False (logits [..., V], targets [...]).

    logsumexp minus the target's logit: its gradient is softmax - one-hot, one fused pass over the
    logits. Logits must be finite wherever a gradient is taken (`Predictions` has no NaN tail).
    """
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, jnp.where(mask, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(mask, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)


def loss_terms(pred: Predictions, *, text_padding_ids=(3, 0), text_padding_weight=0.5,
               first_codebook_weight_multiplier=1.0):
    """Sums that the objective and the token-weighted metrics are built from.

    Returns a dict of scalars / per-codebook vectors: text_ce_sum, text_weighted_sum, text_weight,
    text_count, text_nonpad_ce_sum, text_nonpad_count, audio_ce_sum [dep_q], audio_count [dep_q],
    audio_weighted_sum, audio_weight.
    """
    text_targets, text_mask = pred.text_targets, pred.text_mask
    text_ce = token_cross_entropy(pred.text_logits, text_targets, text_mask)
    is_pad = jnp.zeros_like(text_mask)
    for pad_id in text_padding_ids:
        is_pad |= text_targets == pad_id
    text_w = text_mask * jnp.where(is_pad, text_padding_weight, 1.0)
    nonpad = text_mask & ~is_pad

    audio_ce = token_cross_entropy(pred.logits, pred.targets, pred.mask)  # [dep_q, B, T]
    codebook_w = jnp.ones((audio_ce.shape[0], 1, 1)).at[0].set(first_codebook_weight_multiplier)
    audio_w = pred.mask * codebook_w
    f32 = jnp.float32
    return {
        "text_ce_sum": text_ce.sum(),
        "text_count": text_mask.sum().astype(f32),
        "text_weighted_sum": (text_ce * text_w).sum(),
        "text_weight": text_w.sum(),
        "text_nonpad_ce_sum": jnp.where(nonpad, text_ce, 0.0).sum(),
        "text_nonpad_count": nonpad.sum().astype(f32),
        "audio_ce_sum": audio_ce.sum(axis=(1, 2)),
        "audio_count": pred.mask.sum(axis=(1, 2)).astype(f32),
        "audio_weighted_sum": (audio_ce * audio_w).sum(),
        "audio_weight": audio_w.sum(),
    }


def objective(terms) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(total, text_loss, audio_loss) as moshi-finetune's `compute_loss_with_mask`; an empty side counts 0."""
    text = terms["text_weighted_sum"] / jnp.maximum(terms["text_weight"], 1e-12)
    audio = terms["audio_weighted_sum"] / jnp.maximum(terms["audio_weight"], 1e-12)
    return text + audio, text, audio


def model_terms(model, codes, *, text_padding_weight: float, first_codebook_weight_multiplier: float):
    """`loss_terms` of a model on codes [B, 17, T]: what the train step and the evaluations reduce."""
    cfg = model.cfg
    return loss_terms(model.predictions(codes),
                      text_padding_ids=(cfg.existing_text_padding_id, cfg.existing_text_end_padding_id),
                      text_padding_weight=text_padding_weight,
                      first_codebook_weight_multiplier=first_codebook_weight_multiplier)
