"""The TTT-MLP inner loop of one sequence and one head (docs/contract.md §4), on arrays.

The inner model per (batch element, head) is a 2-layer MLP `f(x) = x + LN(gelu(x W1 + b1) W2 + b2)`
trained online on the sequence by gradient steps on `1/2 ||LN(f_res(XK)) - LNu(XV - XK)||^2`.
Two forms of the same maths:

* dual form (`ttt_mlp_dual`): one scan step per mini-batch of K tokens, every query of the
  mini-batch in a few small matmuls without materialising per-token weights. Used for training
  and prefill. The step has a hand-written VJP (fast matmul layouts on XLA CPU). With
  `scan_remat_group` = 1 (default) the backward pass rebuilds each mini-batch's inner state from
  the next one instead of storing it; with G > 1 the scan runs in jax.checkpoint-ed groups of G
  mini-batches that keep only the state at group boundaries (see `_scan_minibatches`).
* primal form (`primal_step`, `ttt_mlp_primal`): token by token with explicit weights; the
  reference the dual form is tested against, and the step a streaming decoder runs.
* carried form (`ttt_mlp_chunk`): a chunk of T frames continuing a carried `PrimalState` (the
  weights at the start of the current mini-batch, the lr-weighted gradient sums of its tokens
  already seen, the position in it), in the dual form's few matmuls: chunked evaluation. The state
  commits at mini-batch ends exactly as the dual form does.

The inner loop always runs in fp32 (or wider, if the inputs are float64): bf16 inner-loop
gradients drift (ttt-reference.md section 7).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tttjax.errors import UserError

_SQRT_2_OVER_PI = 0.7978845608028654
_GELU_CUBIC = 0.044715
_L2_EPS = 1e-12  # torch F.normalize
_TARGET_EPS = 1e-8  # added to the unbiased std of the reconstruction target (ttt-video-dit)
_INNER_LN_EPS = 1e-8  # inside the sqrt of the inner-loop LayerNorm


# ----------------------------------------------------------------------------------------------
# Validation helpers


def check_scan_args(mini_batch_size: int, scan_remat_group: int) -> None:
    if mini_batch_size < 1:
        raise UserError(f"ttt mini_batch_size={mini_batch_size} must be >= 1")
    if scan_remat_group < 1:
        raise UserError(f"ttt scan_remat_group={scan_remat_group} must be >= 1")


# ----------------------------------------------------------------------------------------------
# Elementwise pieces shared by both forms (fp32 or wider)


def compute_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x)))


def gelu_tanh_grad(x):
    t = jnp.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x * x)


def gelu_tanh_grad2(x):
    """Second derivative of gelu_tanh (the backward of G1 = P * gelu'(Z1))."""
    t = jnp.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x))
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x * x)
    return (1.0 - t * t) * (du - x * t * du * du + 3.0 * _SQRT_2_OVER_PI * _GELU_CUBIC * x * x)


def _safe_sqrt(x):
    """sqrt with a zero (not NaN) gradient at 0, so all-zero rows stay differentiable."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def l2_normalize(x):
    """torch F.normalize over the last axis: x / max(||x||, 1e-12), finite gradient at x = 0."""
    sumsq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sumsq, _L2_EPS * _L2_EPS))


def reconstruction_target(xv, xk, norm_w, norm_b):
    """LNu(XV - XK): mean, unbiased std, (v - mean) / (std + 1e-8), then the ttt_norm affine."""
    v = xv - xk
    centred = v - jnp.mean(v, axis=-1, keepdims=True)
    std = _safe_sqrt(jnp.sum(centred * centred, axis=-1, keepdims=True) / (v.shape[-1] - 1))
    return centred / (std + _TARGET_EPS) * norm_w + norm_b


def _normalize(z):
    centred = z - jnp.mean(z, axis=-1, keepdims=True)
    std = jnp.sqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + _INNER_LN_EPS)
    return centred / std, std


def inner_layer_norm(z, norm_w, norm_b):
    """The inner-loop LayerNorm: biased variance, eps 1e-8 inside the sqrt, ttt_norm affine."""
    return _normalize(z)[0] * norm_w + norm_b


def ln_l2_grad(z, target, norm_w, norm_b):
    """d/dz 1/2 ||LN(z) - target||^2 in closed form (ttt-lm-pytorch `ln_fused_l2_bwd`)."""
    n = z.shape[-1]
    xhat, std = _normalize(z)
    g = (xhat * norm_w + norm_b - target) * norm_w
    return (n * g - jnp.sum(g, axis=-1, keepdims=True)
            - xhat * jnp.sum(g * xhat, axis=-1, keepdims=True)) / (n * std)


def _prepare(xq, xk, xv, norm_w, norm_b):
    """Token-wise preprocessing shared by both forms: L2-normalised XQ, XK and the target."""
    xq, xk = l2_normalize(xq), l2_normalize(xk)
    return xq, xk, reconstruction_target(xv, xk, norm_w, norm_b)


def _pad_time(arrays, multiple: int):
    """Right-pad axis 0 with zeros to a multiple of `multiple` (padded tokens: lr = 0)."""
    T = arrays[0].shape[0]
    pad = -T % multiple
    return [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in arrays]


# ----------------------------------------------------------------------------------------------
# Dual form


def step_sizes(lr, causal: bool):
    """Step-size matrix E[..., i, j] of a mini-batch from lr [..., K]: lr_j / i (j <= i) or lr_j / K."""
    K = lr.shape[-1]
    if causal:
        rows = jnp.arange(1, K + 1, dtype=lr.dtype)[:, None]
        return jnp.tril(lr[..., None, :] / rows)
    return jnp.broadcast_to(lr[..., None, :] / K, lr.shape[:-1] + (K, K))


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def _mean(x):
    return jnp.mean(x, axis=-1, keepdims=True)


# The mini-batch step has a hand-written VJP. Autodiff of it is correct but slow on XLA CPU: it
# emits matmuls whose right operand is a transposed weight matrix (2-3x slower than the
# untransposed layout), negates and accumulates weight-sized cotangents term by term, and (under
# jax.checkpoint) recomputes the whole step.


def _times_wt(x, w):
    """x @ w^T for a weight w [out, in] and a small x [K, in], computed as (w @ x^T)^T.

    XLA CPU runs a matmul whose big right operand contracts its last axis 2-3x slower than one
    with the weight on the left; the barrier stops XLA from folding the transposes back into it.
    """
    return _mT(jax.lax.optimization_barrier(w @ _mT(x)))


def _outer(a, b):
    """a^T @ b over the K rows ([K, m], [K, n] -> [m, n]) with a materialised a^T (~1.4x faster)."""
    return jax.lax.optimization_barrier(_mT(a)) @ b


def _stack_rows(*arrays):
    """[K, n] arrays -> one [len * K, n]: the products that share a weight run as one matmul of
    more rows (a K = 16 mini-batch fills 1/8 of a 128-row matrix-unit tile; two fill 1/4). The 7B
    v5e-16 step's inner scan: 11% less predicted time; this CPU: 8.5% faster (BENCHMARKS.md)."""
    return jnp.concatenate(arrays, axis=-2)


def _split_rows(x, parts: int):
    return jnp.split(x, parts, axis=-2)


def _step_forward(state, mb, norm_w, norm_b):
    """One mini-batch: ((new state, pre-LN output Z2b), activations kept for the backward pass).

    The activations are the step's matmul outputs (about 1/5 of the state's size); everything
    else the backward needs is elementwise in them.
    """
    w1, b1, w2, b2 = state
    xq, xk, target, m1, e, last = mb
    xk_w1, xq_w1 = _split_rows(_stack_rows(xk, xq) @ w1, 2)
    z1 = xk_w1 + b1
    x2 = gelu_tanh(z1)
    z2 = x2 @ w2 + b2
    xhat, std = _normalize(z2)
    g = (xhat * norm_w + norm_b - target) * norm_w
    g2 = (g - _mean(g) - xhat * _mean(g * xhat)) / std  # = ln_l2_grad(z2, target, ...)
    p = _times_wt(g2, w2)
    g1 = p * gelu_tanh_grad(z1)
    z1b = xq_w1 + b1 - m1 @ g1  # m1 = E * (XQ XK^T + 1): the "- E G1" bias term folded in
    x2b = gelu_tanh(z1b)
    a2 = x2b @ _mT(x2) + 1.0
    z2b = x2b @ w2 + b2 - (e * a2) @ g2
    u1, u2 = last[:, None] * g1, last[:, None] * g2
    new_state = (w1 - _outer(xk, u1), b1 - jnp.sum(u1, axis=0, keepdims=True),
                 w2 - _outer(x2, u2), b2 - jnp.sum(u2, axis=0, keepdims=True))
    return (new_state, z2b), (z1, z1b, p, xhat, std, g2, a2)


def _updates(mb, acts):
    """The step's update factors: X2 and U1 = last * G1, U2 = last * G2 (W1' = W1 - XK^T U1, ...)."""
    last = mb[5][:, None]
    z1, _, p, _, _, g2, _ = acts
    return gelu_tanh(z1), last * p * gelu_tanh_grad(z1), last * g2


def _step_backward(w1, w2, mb, norm_w, norm_b, acts, cotangents):
    """VJP of `_step_forward` given the step's starting weights and activations.

    Returns (d state, d mb, d norm_w, d norm_b).
    """
    xq, xk, target, m1, e, last = mb
    z1, z1b, p, xhat, std, g2, a2 = acts
    (dw1_new, db1_new, dw2_new, db2_new), dz2b = cotangents
    x2, u1, u2 = _updates(mb, acts)
    gp, x2b = gelu_tanh_grad(z1), gelu_tanh(z1b)
    g1 = p * gp
    g = (xhat * norm_w + norm_b - target) * norm_w
    # State update: W1' = W1 - XK^T U1, b1' = b1 - sum(U1), same for W2, b2.
    r1 = xk @ dw1_new + db1_new
    r2 = x2 @ dw2_new + db2_new
    dlast = -jnp.sum(g1 * r1, axis=-1) - jnp.sum(g2 * r2, axis=-1)
    dg1 = -last[:, None] * r1
    dg2 = -last[:, None] * r2
    dxk = -_times_wt(u1, dw1_new)
    dx2 = -_times_wt(u2, dw2_new)
    # Z2b = X2b W2 + b2 - (E * A2) G2, A2 = X2b X2^T + 1
    dx2b = _times_wt(dz2b, w2)
    dm2 = -(dz2b @ _mT(g2))
    dg2 = dg2 - _mT(e * a2) @ dz2b
    de = dm2 * a2
    da2 = dm2 * e
    dx2b = dx2b + da2 @ x2
    dx2 = dx2 + _mT(da2) @ x2b
    dz1b = dx2b * gelu_tanh_grad(z1b)
    # Z1b = XQ W1 + b1 - M1 G1
    dm1 = -(dz1b @ _mT(g1))
    dg1 = dg1 - _mT(m1) @ dz1b
    # G1 = P * gelu'(Z1), P = G2 W2^T
    dp = dg1 * gp
    dz1 = dg1 * p * gelu_tanh_grad2(z1)
    dg2 = dg2 + dp @ w2
    # G2 = (g - mean(g) - xhat mean(g xhat)) / std, g = (xhat * w + b - target) * w, xhat = LN(Z2)
    n = xhat.shape[-1]
    c_xhat = _mean(dg2 * xhat)
    dg = (dg2 - _mean(dg2) - xhat * c_xhat) / std
    dxhat = dg * norm_w * norm_w - (_mean(g * xhat) * dg2 + c_xhat * g) / std
    dstd = -jnp.sum(dg2 * g2, axis=-1, keepdims=True) / std
    dz2 = (dxhat - _mean(dxhat) - xhat * _mean(dxhat * xhat)) / std + dstd * xhat / n
    dtarget = -dg * norm_w
    dnorm_w = jnp.sum(dg * (2.0 * norm_w * xhat + norm_b - target), axis=0)
    dnorm_b = jnp.sum(dg * norm_w, axis=0)
    # Z2 = X2 W2 + b2, X2 = gelu(Z1), Z1 = XK W1 + b1
    dx2 = dx2 + _times_wt(dz2, w2)
    dz1 = dz1 + dx2 * gp
    dz_w1 = _stack_rows(dz1b, dz1)  # both cotangents through W1
    dxq, dxk_z1 = _split_rows(_times_wt(dz_w1, w1), 2)
    dxk = dxk + dxk_z1
    dw1 = dw1_new + _outer(_stack_rows(xq, xk), dz_w1)
    db1 = db1_new + jnp.sum(dz1b + dz1, axis=0, keepdims=True)
    dw2 = dw2_new + _outer(_stack_rows(x2b, dp, x2), _stack_rows(dz2b, g2, dz2))
    db2 = db2_new + jnp.sum(dz2b + dz2, axis=0, keepdims=True)
    return (dw1, db1, dw2, db2), (dxq, dxk, dtarget, dm1, de, dlast), dnorm_w, dnorm_b


@jax.custom_vjp
def _dual_step(state, mb, norm_w, norm_b):
    """One mini-batch of the dual form, as a scan body with the hand-written VJP."""
    return _step_forward(state, mb, norm_w, norm_b)[0]


def _dual_step_fwd(state, mb, norm_w, norm_b):
    out, acts = _step_forward(state, mb, norm_w, norm_b)
    return out, (state[0], state[2], mb, norm_w, norm_b, acts)


def _dual_step_bwd(residuals, cotangents):
    w1, w2, mb, norm_w, norm_b, acts = residuals
    return _step_backward(w1, w2, mb, norm_w, norm_b, acts, cotangents)


_dual_step.defvjp(_dual_step_fwd, _dual_step_bwd)


@jax.custom_vjp
def _reversible_scan(state, xs, norm_w, norm_b):
    """All mini-batches, with a backward pass that needs no stored inner state.

    The backward walks the mini-batches in reverse and rebuilds each step's starting weights from
    the next ones, W1 = W1' + XK^T U1 (W2 likewise), with U1, U2 from the kept activations.
    Storing one state per mini-batch instead (a scan under jax.checkpoint) took 2.4x the layer's
    memory at D=1024, T=2048 and 10-25% more time on XLA CPU, much of it zero-filling and copying
    the stacked states. The rebuilt weights differ from the forward's by a few fp32 ulps: the
    gradients move by ~2e-6 relative, as much as between two XLA fusion choices.
    """
    return jax.lax.scan(lambda s, mb: _step_forward(s, mb, norm_w, norm_b)[0], state, xs)


def _reversible_scan_fwd(state, xs, norm_w, norm_b):
    def body(s, mb):
        (new_state, z2b), acts = _step_forward(s, mb, norm_w, norm_b)
        return new_state, (z2b, acts)

    final, (z2b, acts) = jax.lax.scan(body, state, xs)
    return (final, z2b), (final[0], final[2], xs, norm_w, norm_b, acts)


def _reversible_scan_bwd(residuals, cotangents):
    w1, w2, xs, norm_w, norm_b, acts = residuals
    dstate, dz2b = cotangents

    def body(carry, step):
        (w1, w2), dstate, dnorm_w, dnorm_b = carry
        mb, act, dz = step
        x2, u1, u2 = _updates(mb, act)
        w1, w2 = w1 + _outer(mb[1], u1), w2 + _outer(x2, u2)  # this step's starting weights
        dstate, dmb, dw, db = _step_backward(w1, w2, mb, norm_w, norm_b, act, (dstate, dz))
        return ((w1, w2), dstate, dnorm_w + dw, dnorm_b + db), dmb

    init = ((w1, w2), dstate, jnp.zeros_like(norm_w), jnp.zeros_like(norm_b))
    (_, dstate, dnorm_w, dnorm_b), dxs = jax.lax.scan(body, init, (xs, acts, dz2b), reverse=True)
    return dstate, dxs, dnorm_w, dnorm_b


_reversible_scan.defvjp(_reversible_scan_fwd, _reversible_scan_bwd)


def _scan_minibatches(state, xs, norm_w, norm_b, scan_remat_group: int):
    """lax.scan over mini-batches (leading axis of xs) -> (final state, Z2b of every mini-batch).

    scan_remat_group = 1: the reversible scan, which keeps only the step activations (~1/5 of a
    state per mini-batch). G > 1: checkpointed groups of G mini-batches (jax.checkpoint on the
    group body, an inner scan over its G steps) keep one state per group and no activations and
    recompute each group in the backward pass: ~30% slower, and smaller only for large G (the
    backward rebuilds a group's G states at once).
    """
    if scan_remat_group == 1:
        return _reversible_scan(state, xs, norm_w, norm_b)
    num = jax.tree.leaves(xs)[0].shape[0]
    groups = num // scan_remat_group
    xs = jax.tree.map(lambda a: a.reshape(groups, scan_remat_group, *a.shape[1:]), xs)
    body = functools.partial(_dual_step, norm_w=norm_w, norm_b=norm_b)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def group_body(carry, group_xs):
        return jax.lax.scan(body, carry, group_xs)

    state, ys = jax.lax.scan(group_body, state, xs)
    return state, jax.tree.map(lambda a: a.reshape(num, *a.shape[2:]), ys)


def ttt_mlp_dual(xq, xk, xv, lr, w1, b1, w2, b2, norm_w, norm_b, *,
                 mini_batch_size: int, causal: bool = True, scan_remat_group: int = 1):
    """TTT-MLP over one sequence and one head, dual form.

    xq, xk, xv: [T, d] projections (before L2 normalisation); lr: [T] per-token inner step size
    (base_lr * sigmoid(.) / d); w1 [d, 4d], b1 [1, 4d], w2 [4d, d], b2 [1, d]: initial state;
    norm_w, norm_b: [d] ttt_norm affine. Returns (out [T, d], final state (w1, b1, w2, b2)), in
    fp32 (float64 if the inputs are). The final state includes the zero-padded last mini-batch.
    """
    check_scan_args(mini_batch_size, scan_remat_group)
    dt = compute_dtype(xq.dtype)
    xq, xk, xv, lr, w1, b1, w2, b2, norm_w, norm_b = (
        a.astype(dt) for a in (xq, xk, xv, lr, w1, b1, w2, b2, norm_w, norm_b))
    T, d = xq.shape
    K = mini_batch_size
    xq, xk, target = _prepare(xq, xk, xv, norm_w, norm_b)
    xq, xk, target, lr = _pad_time([xq, xk, target, lr], K * scan_remat_group)
    num = xq.shape[0] // K
    xq, xk, target = (a.reshape(num, K, d) for a in (xq, xk, target))
    lr = lr.reshape(num, K)
    # Everything that does not depend on the inner state is computed for all mini-batches at once.
    e = step_sizes(lr, causal)
    m1 = e * (xq @ jnp.swapaxes(xk, -1, -2) + 1.0)
    last = lr / K  # E[K, :], the same in both modes
    state, z2b = _scan_minibatches((w1, b1, w2, b2), (xq, xk, target, m1, e, last), norm_w, norm_b,
                                   scan_remat_group)
    out = xq + inner_layer_norm(z2b, norm_w, norm_b)
    return out.reshape(num * K, d)[:T], state


# ----------------------------------------------------------------------------------------------
# Primal form


class PrimalState(NamedTuple):
    """Streaming state of one head: weights at the mini-batch start, sum_j lr_j grad_j, position."""

    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array
    gw1: jax.Array
    gb1: jax.Array
    gw2: jax.Array
    gb2: jax.Array
    pos: jax.Array  # int32 scalar: tokens of the current mini-batch already absorbed


class TTTToken(NamedTuple):
    """One token's inputs: raw projections xq, xk, xv [d] and its inner step size lr (scalar)."""

    xq: jax.Array
    xk: jax.Array
    xv: jax.Array
    lr: jax.Array


def init_primal_state(w1, b1, w2, b2) -> PrimalState:
    dt = compute_dtype(w1.dtype)
    weights = [a.astype(dt) for a in (w1, b1, w2, b2)]
    return PrimalState(*weights, *(jnp.zeros_like(a) for a in weights), jnp.zeros((), jnp.int32))


def _token_grads(w1, b1, w2, b2, xk, target, norm_w, norm_b):
    """Per-token gradients of the inner loss at the given weights: (X2, G1 = dL/dZ1, G2 = dL/dZ2)."""
    z1 = xk @ w1 + b1
    x2 = gelu_tanh(z1)
    g2 = ln_l2_grad(x2 @ w2 + b2, target, norm_w, norm_b)
    return x2, (g2 @ w2.T) * gelu_tanh_grad(z1), g2


def _absorb(state: PrimalState, token: TTTToken, norm_w, norm_b):
    """Adds lr * grad of this token's loss (taken at the mini-batch start weights); returns xq too."""
    dt = state.w1.dtype
    xq, xk, xv = (a.astype(dt)[None, :] for a in (token.xq, token.xk, token.xv))
    lr = token.lr.astype(dt)
    xq, xk, target = _prepare(xq, xk, xv, norm_w, norm_b)
    x2, g1, g2 = _token_grads(state.w1, state.b1, state.w2, state.b2, xk, target, norm_w, norm_b)
    state = state._replace(gw1=state.gw1 + lr * (xk.T @ g1), gb1=state.gb1 + lr * g1,
                           gw2=state.gw2 + lr * (x2.T @ g2), gb2=state.gb2 + lr * g2, pos=state.pos + 1)
    return state, xq


def _query(state: PrimalState, xq, count, norm_w, norm_b):
    """xq + LN(f(xq)) under the weights W_start - (1 / count) sum_j lr_j grad_j.

    x @ (W - G / count) is evaluated as x @ W - (x @ G) / count: no weight-sized temporaries,
    which dominate a decode step otherwise.
    """
    z1 = xq @ state.w1 - (xq @ state.gw1) / count + state.b1 - state.gb1 / count
    x2 = gelu_tanh(z1)
    z2 = x2 @ state.w2 - (x2 @ state.gw2) / count + state.b2 - state.gb2 / count
    return xq + inner_layer_norm(z2, norm_w, norm_b)


def _commit(state: PrimalState, count) -> PrimalState:
    """Starts the next mini-batch from W_start - (1 / count) sum_j lr_j grad_j."""
    weights = [w - g / count for w, g in zip(state[:4], state[4:8])]
    return init_primal_state(*weights)


def primal_step(state: PrimalState, token: TTTToken, norm_w, norm_b, *, mini_batch_size: int):
    """One causal token step: absorb the token, answer its query, commit at the mini-batch end.

    Token i (1-based) of a mini-batch uses W_start - sum_{j<=i} (lr_j / i) grad_j. Returns
    (state, out [d]). Shapes as `ttt_mlp_dual` for one token; vmap over batch and heads.
    """
    dt = state.w1.dtype
    norm_w, norm_b = norm_w.astype(dt), norm_b.astype(dt)
    state, xq = _absorb(state, token, norm_w, norm_b)
    out = _query(state, xq, state.pos.astype(dt), norm_w, norm_b)[0]
    state = jax.lax.cond(state.pos == mini_batch_size, lambda s: _commit(s, mini_batch_size), lambda s: s, state)
    return state, out


def ttt_mlp_primal(xq, xk, xv, lr, w1, b1, w2, b2, norm_w, norm_b, *,
                   mini_batch_size: int, causal: bool = True):
    """The same function as `ttt_mlp_dual`, token by token with explicit weights (tests, decode).

    causal: a `lax.scan` of `primal_step`. Non-causal: per mini-batch, absorb every token, then
    answer each query with the end-of-mini-batch weights (a query needs the future, so there is
    no streaming step for this mode). The token scan is nested in a scan over mini-batches whose
    body is checkpointed; otherwise the backward pass would keep per-token weights (MBs a token).
    """
    check_scan_args(mini_batch_size, 1)
    dt = compute_dtype(xq.dtype)
    K = mini_batch_size
    T = xq.shape[0]
    norm_w, norm_b = norm_w.astype(dt), norm_b.astype(dt)
    tokens = TTTToken(*_pad_time([a.astype(dt) for a in (xq, xk, xv, lr)], K))

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def minibatch(state, mb_tokens):
        if causal:
            step = functools.partial(primal_step, norm_w=norm_w, norm_b=norm_b, mini_batch_size=K)
            return jax.lax.scan(step, state, mb_tokens)
        state, xq = jax.lax.scan(lambda s, tok: _absorb(s, tok, norm_w, norm_b), state, mb_tokens)
        out = jax.vmap(lambda q: _query(state, q, K, norm_w, norm_b))(xq)
        return _commit(state, K), out[:, 0]

    mbs = jax.tree.map(lambda a: a.reshape(-1, K, *a.shape[1:]), tokens)
    state, out = jax.lax.scan(minibatch, init_primal_state(w1, b1, w2, b2), mbs)
    return out.reshape(-1, out.shape[-1])[:T], tuple(state[:4])


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
        x2, g1, g2 = _token_grads(w1, b1, w2, b2, k, tg, norm_w, norm_b)
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
