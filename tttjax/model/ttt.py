"""TTT-MLP layer (docs/contract.md §4): the gated TTT branch inserted into temporal layers.

`TTTMLP` projects a layer's hidden states to per-head queries, keys, values and inner step
sizes, runs the inner loop of every (sequence, head) (`ttt_inner`: the dual form for training,
the primal form token by token for tests, the carried form for decoding and chunked
evaluation), and projects back; `TTTGatedBlock` adds the result to its input through a tanh gate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tttjax.errors import UserError
from tttjax.model.transformer import QKV_PROJ
from tttjax.model.ttt_inner import (
    PrimalState,
    TTTToken,
    check_scan_args,
    compute_dtype,
    init_primal_state,
    primal_step,
    ttt_mlp_chunk,
    ttt_mlp_dual,
    ttt_mlp_primal,
)

__all__ = ["PrimalState", "TTTGatedBlock", "TTTMLP", "TTTToken", "init_primal_state", "primal_step",
           "ttt_mlp_dual", "ttt_mlp_primal"]

_POST_NORM_EPS = 1e-6


def _param(init, key, shape, dtype, names):
    return nnx.Param(init(key, shape, dtype), out_sharding=names)


class TTTMLP(nnx.Module):
    """TTT(h) = wo(post_norm(merged heads of the inner-loop output)), docs/contract.md §4."""

    def __init__(self, dim: int, num_heads: int, *, mini_batch_size: int, base_lr: float, causal: bool = True,
                 scan_remat_group: int = 1, param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs):
        if num_heads < 1 or dim % num_heads:
            raise UserError(f"ttt num_heads={num_heads} does not divide dim={dim}")
        check_scan_args(mini_batch_size, scan_remat_group)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.mini_batch_size = mini_batch_size
        self.base_lr = base_lr
        self.causal = causal
        self.scan_remat_group = scan_remat_group
        self.dtype = dtype
        self.inner_dtype = compute_dtype(dtype)  # fp32, or float64 for float64 models (tests)
        H, d, D = num_heads, self.head_dim, dim
        normal = nnx.initializers.normal(0.02)
        zeros, ones = nnx.initializers.zeros, nnx.initializers.ones

        def linear(in_axis, out_axis):
            return nnx.Linear(D, D, use_bias=True, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=nnx.with_partitioning(normal, (in_axis, out_axis)),
                              bias_init=nnx.with_partitioning(zeros, (out_axis,)), rngs=rngs)

        self.wq = linear("embed", "heads")
        self.wk = linear("embed", "heads")
        self.wv = linear("embed", "heads")
        self.wo = linear("heads", "embed")
        self.post_norm = nnx.LayerNorm(D, epsilon=_POST_NORM_EPS, dtype=self.inner_dtype, param_dtype=param_dtype,
                                       use_fast_variance=False,
                                       scale_init=nnx.with_partitioning(ones, ("embed",)),
                                       bias_init=nnx.with_partitioning(zeros, ("embed",)), rngs=rngs)
        p = param_dtype
        self.W1 = _param(normal, rngs.params(), (H, d, 4 * d), p, ("ttt_heads", "ttt_head_dim", "ttt_hidden"))
        self.b1 = _param(zeros, None, (H, 1, 4 * d), p, ("ttt_heads", None, "ttt_hidden"))
        self.W2 = _param(normal, rngs.params(), (H, 4 * d, d), p, ("ttt_heads", "ttt_hidden", "ttt_head_dim"))
        self.b2 = _param(zeros, None, (H, 1, d), p, ("ttt_heads", None, "ttt_head_dim"))
        self.learnable_ttt_lr_weight = _param(normal, rngs.params(), (H, 1, D), p, ("ttt_heads", None, "embed"))
        self.learnable_ttt_lr_bias = _param(zeros, None, (H, 1), p, ("ttt_heads", None))
        self.ttt_norm_weight = _param(ones, None, (H, d), p, ("ttt_heads", "ttt_head_dim"))
        self.ttt_norm_bias = _param(zeros, None, (H, d), p, ("ttt_heads", "ttt_head_dim"))

    def inner_lr(self, h):
        """lr[b, t, head] = base_lr * sigmoid(h_t . lr_weight[head] + lr_bias[head]) / d, in fp32 (or wider)."""
        dt = self.inner_dtype
        logits = jnp.einsum("btc,hc->bth", h.astype(dt), self.learnable_ttt_lr_weight[...][:, 0, :].astype(dt))
        logits = logits + self.learnable_ttt_lr_bias[...][:, 0].astype(dt)
        return self.base_lr * jax.nn.sigmoid(logits) / self.head_dim

    def init_state(self, batch_size: int) -> PrimalState:
        """The carried state of a stream of `batch_size` sequences: leaves [B, H, ...], every sequence
        starting from this layer's W1, b1, W2, b2 (own buffers: decoding donates the state)."""
        weights = [jnp.array(jnp.broadcast_to(p[...].astype(self.inner_dtype), (batch_size,) + p.shape), copy=True)
                   for p in (self.W1, self.b1, self.W2, self.b2)]
        return PrimalState(*weights, *(jnp.zeros_like(w) for w in weights),
                           jnp.zeros((batch_size, self.num_heads), jnp.int32))

    def __call__(self, h, *, offset=0, state: PrimalState | None = None, form: str = "dual"):
        """h [B, T, D] -> (out [B, T, D] in self.dtype, state).

        Without a state: the whole sequence from this layer's initial weights, in the dual form
        (training, full forward) or, `form="primal"`, token by token (tests, benchmarks). With a
        carried state (decoding, chunked evaluation; `init_state`): the T frames at positions
        offset.. continue it, causal only, and the state comes back updated.
        """
        B, T, D = h.shape
        H, d, K = self.num_heads, self.head_dim, self.mini_batch_size
        xq, xk, xv = (checkpoint_name(proj(h), QKV_PROJ).reshape(B, T, H, d) for proj in (self.wq, self.wk, self.wv))
        lr = self.inner_lr(h)  # [B, T, H]
        norm_w, norm_b = self.ttt_norm_weight[...], self.ttt_norm_bias[...]
        if state is not None:
            if not self.causal:
                raise UserError("ttt.causal=False: a frame reads future frames of its mini-batch, so the TTT "
                                 "state cannot be carried frame by frame")
            if T == 1:  # one frame: the primal step
                step = jax.vmap(functools.partial(primal_step, mini_batch_size=K), in_axes=(0, TTTToken(0, 0, 0, 0), 0, 0))
                batch = jax.vmap(step, in_axes=(0, TTTToken(0, 0, 0, 0), None, None))
                state, out = batch(state, TTTToken(xq[:, 0], xk[:, 0], xv[:, 0], lr[:, 0]), norm_w, norm_b)
                out = out[:, None]  # [B, 1, H, d]
            else:
                core = functools.partial(ttt_mlp_chunk, mini_batch_size=K, start=jnp.mod(offset, K))
                heads = jax.vmap(core, in_axes=(0, 1, 1, 1, 1, 0, 0), out_axes=(0, 1))
                state, out = jax.vmap(heads, in_axes=(0, 0, 0, 0, 0, None, None), out_axes=(0, 0))(
                    state, xq, xk, xv, lr, norm_w, norm_b)
        else:
            if form == "dual":
                core = functools.partial(ttt_mlp_dual, mini_batch_size=K, causal=self.causal,
                                         scan_remat_group=self.scan_remat_group)
            elif form == "primal":
                core = functools.partial(ttt_mlp_primal, mini_batch_size=K, causal=self.causal)
            else:
                raise ValueError(f"TTTMLP form={form!r}: expected 'dual' or 'primal'")
            per_head = jax.vmap(core, in_axes=(1, 1, 1, 1) + (0,) * 6, out_axes=(1, 0))
            per_batch = jax.vmap(per_head, in_axes=(0, 0, 0, 0) + (None,) * 6, out_axes=(0, 0))
            inner = [p[...] for p in (self.W1, self.b1, self.W2, self.b2)]
            out, _ = per_batch(xq, xk, xv, lr, *inner, norm_w, norm_b)
        out = self.post_norm(out.reshape(B, T, D).astype(self.inner_dtype))
        return self.wo(out.astype(self.dtype)).astype(self.dtype), state


class TTTGatedBlock(nnx.Module):
    """The TTT residual branch of a layer: h + tanh(gating_alpha) * TTT(h), mixed in fp32, in h's dtype."""

    def __init__(self, dim: int, num_heads: int, *, initial_gating_alpha: float, mini_batch_size: int,
                 base_lr: float, causal: bool = True, scan_remat_group: int = 1, param_dtype=jnp.float32,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.ttt = TTTMLP(dim, num_heads, mini_batch_size=mini_batch_size, base_lr=base_lr, causal=causal,
                          scan_remat_group=scan_remat_group, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.gating_alpha = nnx.Param(jnp.full((dim,), initial_gating_alpha, param_dtype), out_sharding=("embed",))

    def __call__(self, h, *, offset=0, state: PrimalState | None = None, form: str = "dual"):
        """-> (h + tanh(alpha) * TTT(h), state); see `TTTMLP.__call__`."""
        dt = self.ttt.inner_dtype
        gate = jnp.tanh(self.gating_alpha[...].astype(dt))
        y, state = self.ttt(h, offset=offset, state=state, form=form)
        return (h.astype(dt) + gate * y.astype(dt)).astype(h.dtype), state
