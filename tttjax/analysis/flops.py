"""Analytic model FLOPs: the useful work of a step, what MFU divides by (perf.py, the trainer's log).

Forward, per token: a matmul of [in] -> [out] costs 2*in*out; attention 4*D per visible key (scores
and the weighted sum); the TTT-MLP branch its four D x D projections plus the dual-form inner loop,
H*(14*d*4d + 6*K*d + 6*K*4d) for head size d, mini-batch K (ttt-reference.md); LoRA 2*r*(in + out)
on every Linear that carries an adapter.

A training step (`train_step_flops`) counts what the gradient needs, and nothing twice:
  - weights that train (every weight with full fine-tuning; LoRA adapters and TTT otherwise): 3x
    their forward (forward, input gradient, weight gradient);
  - frozen weights (the base under LoRA): 2x (forward and the input gradient that flows through
    them to the adapters below; no weight gradient);
  - attention (no weights): 3x (forward; the gradient of Q, K and V costs twice the forward).
Rematerialisation recomputes forwards: that is not useful work and is not counted (XLA's own count
in perf.py includes it: the ratio of the two is what remat and the frozen base cost).
"""

from __future__ import annotations

import dataclasses

from tttjax.model.config import ModelConfig


def mean_context(T: int, context: int | None) -> float:
    """Mean number of keys a query sees under causal attention with moshi's window."""
    if context is None or context >= T:
        return (T + 1) / 2
    return sum(min(q + 1, context) for q in range(T)) / T


def _layer_matmuls(D: int, hidden: int) -> float:
    """One transformer layer's weight matmuls: in/out projections, SiLU-GLU (linear_in to 2*hidden)."""
    return 2 * (D * 3 * D + D * D + D * 2 * hidden + hidden * D)


def _layer_lora(D: int, hidden: int, rank: int) -> float:
    """LoRA on the same four Linears."""
    return 2 * rank * ((D + 3 * D) + (D + D) + (D + 2 * hidden) + (hidden + D))


def layer_flops(D: int, hidden: int, T: int, context: int | None) -> float:
    """One transformer layer: in/out projections, SiLU-GLU (linear_in to 2*hidden), attention."""
    return _layer_matmuls(D, hidden) + 4 * D * mean_context(T, context)


def ttt_flops(D: int, heads: int, mini_batch: int = 16) -> float:
    """One TTT-MLP branch: its 4 D x D projections (Q, K, V, O) and the dual-form inner loop."""
    d, K = D // heads, mini_batch
    return 4 * 2 * D * D + heads * (14 * d * 4 * d + 6 * K * d + 6 * K * 4 * d)


@dataclasses.dataclass(frozen=True)
class FrameFlops:
    """Forward FLOPs per frame, by how a training step treats them."""

    base: float  # weight matmuls of the base model (frozen under LoRA)
    attention: float  # scores and weighted sums
    lora: float  # adapter matmuls
    ttt: float  # TTT branches (all their weights train)

    @property
    def forward(self) -> float:
        return self.base + self.attention + self.lora + self.ttt

    def train(self, full_finetuning: bool) -> float:
        return (3 if full_finetuning else 2) * self.base + 3 * (self.attention + self.lora + self.ttt)


def frame_flops(cfg: ModelConfig, T: int) -> FrameFlops:
    """The temporal layers, the text head, depformer_in, the depformer's dep_q slots and heads, TTT."""
    D, S, dd, r = cfg.dim, cfg.dep_q, cfg.depformer_dim, cfg.lora_rank
    base = (cfg.num_layers * _layer_matmuls(D, cfg.hidden) + cfg.depformer_num_layers * S * _layer_matmuls(
        dd, cfg.depformer_hidden) + 2 * D * cfg.text_card + S * 2 * D * dd + S * 2 * dd * cfg.card)
    attention = 4 * (cfg.num_layers * D * mean_context(T, cfg.context)
                     + cfg.depformer_num_layers * S * dd * mean_context(S, None))
    lora = 0.0
    if r:
        lora = (cfg.num_layers * _layer_lora(D, cfg.hidden, r) + cfg.depformer_num_layers * S * _layer_lora(
            dd, cfg.depformer_hidden, r) + 2 * r * ((D + cfg.text_card) + S * (D + dd) + S * (dd + cfg.card)))
    ttt = len(cfg.ttt_layers) * ttt_flops(D, cfg.ttt_heads, cfg.ttt_mini_batch_size)
    return FrameFlops(base, attention, lora, ttt)


def forward_flops_per_frame(cfg: ModelConfig, T: int) -> float:
    """The base model's forward per frame (no LoRA): the usual "model FLOPs" of the architecture."""
    f = frame_flops(cfg, T)
    return f.base + f.attention + f.ttt


def train_step_flops(cfg: ModelConfig, batch_size: int, frames: int, *, full_finetuning: bool) -> float:
    """Useful FLOPs of one training step over [batch_size, frames] (the module docstring's formula)."""
    return batch_size * frames * frame_flops(cfg, frames).train(full_finetuning)
