"""AdamW with moshi-finetune's OneCycle schedule (torch defaults), grad clipping and per-group LR.

moshi-finetune uses `torch.optim.lr_scheduler.OneCycleLR(max_lr=lr, total_steps=max_steps,
pct_start)` with its defaults: cosine annealing, div_factor 25, final_div_factor 1e4 and
cycle_momentum=True, which drives Adam's beta1 0.95 -> 0.85 during warm-up and back to 0.95.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

DIV_FACTOR = 25.0
FINAL_DIV_FACTOR = 1e4
BASE_MOMENTUM, MAX_MOMENTUM = 0.85, 0.95

def _cos_anneal(start, end, pct):
    return end + (start - end) / 2.0 * (jnp.cos(jnp.pi * pct) + 1.0)


def _one_cycle(step, total_steps: int, pct_start: float, start, peak, end):
    """Value of a torch OneCycle (two-phase, cosine) quantity going start -> peak -> end."""
    warm_end = float(pct_start * total_steps) - 1.0
    last = float(total_steps - 1)
    step = jnp.asarray(step, jnp.float32)
    warm = _cos_anneal(start, peak, step / warm_end) if warm_end > 0 else peak
    down = _cos_anneal(peak, end, (step - warm_end) / max(last - warm_end, 1e-9))
    return jnp.where(step <= warm_end, warm, down)


def one_cycle_lr(max_lr: float, total_steps: int, pct_start: float):
    initial = max_lr / DIV_FACTOR
    return lambda step: _one_cycle(step, total_steps, pct_start, initial, max_lr, initial / FINAL_DIV_FACTOR)


def one_cycle_beta1(total_steps: int, pct_start: float):
    return lambda step: _one_cycle(step, total_steps, pct_start, MAX_MOMENTUM, BASE_MOMENTUM, MAX_MOMENTUM)


def param_group(path: tuple[str, ...]) -> str:
    """Which LR group a parameter path belongs to (decided by path, never by substring)."""
    if path and path[0] == "ttt":
        return "gate" if path[-1] == "gating_alpha" else "ttt"
    return "base"


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`torch.nn.utils.clip_grad_norm_` as moshi-finetune calls it: g * min(1, max_norm / (norm + 1e-6)).

    One scalar multiply that XLA fuses into AdamW's passes; optax's `clip_by_global_norm`
    (`where(norm < max_norm, g, g / norm * max_norm)`) writes a scaled copy of every gradient and
    reads both in each moment update: 4 more passes over the gradients per step.
    """

    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / (optax.global_norm(updates) + 1e-6))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(optim, max_steps: int, labels):
    """optax chain: global-norm clipping, then AdamW per group with its LR multiplier.

    optim: the `optim` config block (lr, weight_decay, pct_start, b1, b2, eps, max_norm,
    cycle_momentum, ttt_lr_multiplier, gate_lr_multiplier). labels: pytree of group names.
    """
    multipliers = {"base": 1.0, "ttt": optim.ttt_lr_multiplier, "gate": optim.gate_lr_multiplier}

    def adamw(multiplier: float):
        lr = one_cycle_lr(optim.lr * multiplier, max_steps, optim.pct_start)
        b1 = one_cycle_beta1(max_steps, optim.pct_start) if optim.cycle_momentum else optim.b1
        return optax.inject_hyperparams(optax.adamw)(
            learning_rate=lr, b1=b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)

    used = sorted(set(jax.tree.leaves(labels)))
    return optax.chain(
        clip_by_global_norm(optim.max_norm),
        optax.multi_transform({g: adamw(multipliers[g]) for g in used}, labels),
    )
