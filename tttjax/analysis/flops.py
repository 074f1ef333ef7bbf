"""Analytic model FLOPs (forward, per token; a training step counts 3x the forward).

A matmul of [in] -> [out] costs 2*in*out per token; attention costs 4*D per visible key (scores and
the weighted sum); the TTT-MLP inner loop follows ttt-reference.md: H*(14*d*4d + 6*K*d + 6*K*4d)
per token for head size d, mini-batch K. LoRA's small matmuls are not counted (the usual "model
FLOPs" of the base model), so for adapter training the step's FLOPs are a convention, not a count.
"""

from __future__ import annotations

from tttjax.model.config import ModelConfig


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


def forward_flops_per_frame(cfg: ModelConfig, T: int) -> float:
    """The temporal layers, the text head, depformer_in, the depformer's dep_q slots and heads, TTT."""
    D, S, dd = cfg.dim, cfg.dep_q, cfg.depformer_dim
    temporal = cfg.num_layers * layer_flops(D, cfg.hidden, T, cfg.context)
    depformer = cfg.depformer_num_layers * S * layer_flops(dd, cfg.depformer_hidden, S, None)
    heads = 2 * D * cfg.text_card + S * 2 * D * dd + S * 2 * dd * cfg.card
    ttt = len(cfg.ttt_layers) * ttt_flops(D, cfg.ttt_heads, cfg.ttt_mini_batch_size)
    return temporal + depformer + heads + ttt


def train_step_flops(cfg: ModelConfig, batch_size: int, frames: int) -> float:
    """Model FLOPs of one training step over [batch_size, frames] (forward + backward = 3x forward)."""
    return 3.0 * batch_size * frames * forward_flops_per_frame(cfg, frames)
