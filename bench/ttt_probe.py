"""What a trained model's TTT layers do on real inputs: inner-loop losses and outer gradient norms.

Used by bench/in_context.py (and its sweep) to explain a result; nothing here runs in training.

* `inner_losses(model, codes)`: for every TTT layer and head, the inner-loop (reconstruction) loss
  of each mini-batch's tokens under the weights the sequence started from (W0), under the weights
  at the start of that mini-batch (before its update) and after it, averaged over the sequences:
  the "ttt_loss_mse_init / step_0 / step_1" curves of the TTT paper (Fig. 4). `before` falling
  below `init` along the sequence is memory: what earlier mini-batches taught the inner model
  helps on the new one. The updates are recomputed here with jax.grad of the inner loss (not the
  dual form's hand-written gradients): tests/test_in_context.py checks that the last mini-batch's
  `after` weights equal the dual form's final state.
* `gradient_norms(model, codes)`: the L2 norm of the training objective's gradient for each TTT
  parameter (over all TTT layers) and for the gates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tttjax.model import ttt as ttt_module
from tttjax.model.params import flat_params, path_of
from tttjax.model.transformer import layer_at
from tttjax.model.ttt_inner import gelu_tanh, inner_layer_norm, l2_normalize, reconstruction_target
from tttjax.objective import model_terms, objective


def ttt_inputs(model, codes) -> list[jax.Array]:
    """The hidden states [B, T, D] entering each TTT branch of `model` on `codes` [B, 17, T]."""
    seen = []
    call = ttt_module.TTTGatedBlock.__call__

    def recording(self, h, **kwargs):
        seen.append(h)
        return call(self, h, **kwargs)

    ttt_module.TTTGatedBlock.__call__ = recording  # eager forward: the arrays are concrete
    try:
        model(jnp.asarray(codes))
    finally:
        ttt_module.TTTGatedBlock.__call__ = call
    return seen


def _token_loss(weights, xk, target, norm_w, norm_b):
    """1/2 ||LN(gelu(xk W1 + b1) W2 + b2) - target||^2 per token (xk already L2-normalised)."""
    w1, b1, w2, b2 = weights
    z2 = gelu_tanh(xk @ w1 + b1) @ w2 + b2
    return 0.5 * jnp.sum((inner_layer_norm(z2, norm_w, norm_b) - target) ** 2, axis=-1)


def _head_losses(xk, xv, lr, w1, b1, w2, b2, norm_w, norm_b, *, mini_batch_size: int):
    """One head of one sequence: (init, before, after) [num mini-batches], final weights."""
    K = mini_batch_size
    n = xk.shape[0] // K
    xk = l2_normalize(xk)
    target = reconstruction_target(xv, xk, norm_w, norm_b)  # of the normalised keys, as ttt_inner._prepare
    xk, target, lr = xk[:n * K].reshape(n, K, -1), target[:n * K].reshape(n, K, -1), lr[:n * K].reshape(n, K)
    start = (w1, b1, w2, b2)

    def step(weights, batch):
        k, tg, eta = batch
        grads = jax.grad(lambda w: jnp.sum(eta / K * _token_loss(w, k, tg, norm_w, norm_b)))(weights)
        updated = jax.tree.map(jnp.subtract, weights, grads)
        losses = [_token_loss(w, k, tg, norm_w, norm_b).mean() for w in (start, weights, updated)]
        return updated, jnp.stack(losses)

    final, losses = jax.lax.scan(step, start, (xk, target, lr))
    return losses.T, final


def layer_inner_losses(block, h):
    """init, before, after [heads, mini-batches] (means over the batch) and the final weights
    [B, heads, ...] of one `TTTGatedBlock` on its input h [B, T, D]; whole mini-batches only."""
    m = block.ttt
    B, T, _ = h.shape
    xk, xv = (proj(h).reshape(B, T, m.num_heads, m.head_dim) for proj in (m.wk, m.wv))
    lr = m.inner_lr(h)
    dt = m.inner_dtype
    weights = [p[...].astype(dt) for p in (m.W1, m.b1, m.W2, m.b2)]
    norm = [p[...].astype(dt) for p in (m.ttt_norm_weight, m.ttt_norm_bias)]

    def head(xk, xv, lr, w1, b1, w2, b2, norm_w, norm_b):
        return _head_losses(xk, xv, lr, w1, b1, w2, b2, norm_w, norm_b, mini_batch_size=m.mini_batch_size)

    per_head = jax.vmap(head, in_axes=(1, 1, 1, 0, 0, 0, 0, 0, 0))
    per_batch = jax.vmap(per_head, in_axes=(0, 0, 0) + (None,) * 6)
    losses, final = per_batch(xk.astype(dt), xv.astype(dt), lr, *weights, *norm)  # losses [B, H, 3, n]
    mean = np.asarray(losses.mean(axis=0))
    return {"init": mean[:, 0], "before": mean[:, 1], "after": mean[:, 2]}, final


def inner_losses(model, codes) -> list[dict]:
    """Per TTT layer: {"layer", "gate_mean_abs", "inner_lr_mean" [heads], "init"/"before"/"after"
    [heads][mini-batches]} on `codes` (see the module docstring)."""
    out = []
    for j, h in enumerate(ttt_inputs(model, codes)):
        block = layer_at(model.ttt, j)
        losses, _ = layer_inner_losses(block, h)
        out.append({"layer": int(model.cfg.ttt_layers[j]),
                    "gate_mean_abs": float(np.abs(np.tanh(np.asarray(block.gating_alpha[...]))).mean()),
                    "inner_lr_mean": np.asarray(block.ttt.inner_lr(h).mean(axis=(0, 1))).tolist(),
                    **{k: v.tolist() for k, v in losses.items()}})
    return out


def gradient_norms(model, codes, *, first_codebook_weight_multiplier: float = 1.0,
                   text_padding_weight: float = 0.5) -> dict[str, float]:
    """{TTT parameter name: L2 norm of d objective / d param over all TTT layers} on `codes`, with
    the objective the trainer minimises."""
    def loss(m):
        return objective(model_terms(m, jnp.asarray(codes), text_padding_weight=text_padding_weight,
                                     first_codebook_weight_multiplier=first_codebook_weight_multiplier))[0]

    grads = nnx.grad(loss)(model)
    norms: dict[str, float] = {}
    for path, value in nnx.to_flat_state(grads):
        path = path_of(path)
        if path[0] != "ttt":
            continue
        name = "/".join(path[1:])
        norms[name] = float(jnp.sqrt(norms.get(name, 0.0) ** 2 + jnp.sum(jnp.square(value.get_value()))))
    return norms


def parameter_norms(model) -> dict[str, float]:
    """{TTT parameter name: L2 norm}, to read gradient norms against."""
    return {"/".join(p[1:]): float(jnp.linalg.norm(v.ravel())) for p, v in flat_params(model).items() if p[0] == "ttt"}
