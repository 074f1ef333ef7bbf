"""TTT-MLP layer tests against an independent float64 NumPy primal-form reference (docs/contract.md §4)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from tttjax.model.config import parse_ttt_layers
from tttjax.model.ttt import (
    TTTMLP,
    TTTGatedBlock,
    TTTToken,
    init_primal_state,
    primal_step,
    ttt_mlp_dual,
    ttt_mlp_primal,
)

# ----------------------------------------------------------------------------------------------
# NumPy float64 reference: token by token, explicit per-token weights, explicit LN Jacobian.


def np_gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_gelu_grad(x):
    u = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
    du = math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x**2)
    return 0.5 * (1 + np.tanh(u)) + 0.5 * x * (1 - np.tanh(u) ** 2) * du


def np_ln(z, w, b, eps):
    s = np.sqrt(z.var() + eps)
    return (z - z.mean()) / s * w + b


def np_ln_loss_grad(z, target, w, b, eps=1e-8):
    """grad of 1/2||LN(z) - target||^2 through the explicit Jacobian of z -> (z - mean)/std."""
    n = z.size
    s = np.sqrt(z.var() + eps)
    xhat = (z - z.mean()) / s
    jac = (np.eye(n) - 1.0 / n - np.outer(xhat, xhat) / n) / s  # d xhat / d z (symmetric)
    return jac.T @ ((xhat * w + b - target) * w)


def np_ttt_head(xq, xk, xv, lr, w1, b1, w2, b2, nw, nb, K, causal):
    """One head, one sequence. Returns (out [T, d], final (w1, b1, w2, b2)) with padding as the design says."""
    T, d = xq.shape
    xq = xq / np.maximum(np.linalg.norm(xq, axis=-1, keepdims=True), 1e-12)
    xk = xk / np.maximum(np.linalg.norm(xk, axis=-1, keepdims=True), 1e-12)
    v = xv - xk
    target = (v - v.mean(-1, keepdims=True)) / (v.std(-1, ddof=1, keepdims=True) + 1e-8) * nw + nb
    pad = -T % K
    xq, xk, target = (np.concatenate([a, np.zeros((pad, d))]) for a in (xq, xk, target))
    lr = np.concatenate([lr, np.zeros(pad)])
    W = [w1.copy(), b1[0].copy(), w2.copy(), b2[0].copy()]
    out = np.zeros_like(xq)
    for start in range(0, T + pad, K):
        grads = []
        for j in range(start, start + K):
            z1 = xk[j] @ W[0] + W[1]
            x2 = np_gelu(z1)
            gz2 = np_ln_loss_grad(x2 @ W[2] + W[3], target[j], nw, nb)
            gz1 = (W[2] @ gz2) * np_gelu_grad(z1)
            grads.append([np.outer(xk[j], gz1), gz1, np.outer(x2, gz2), gz2])
        for i in range(K):
            used = range(i + 1) if causal else range(K)
            scale = (i + 1) if causal else K
            Wi = [W[p] - sum(lr[start + j] / scale * grads[j][p] for j in used) for p in range(4)]
            z2 = np_gelu(xq[start + i] @ Wi[0] + Wi[1]) @ Wi[2] + Wi[3]
            out[start + i] = xq[start + i] + np_ln(z2, nw, nb, 1e-8)
        W = [W[p] - sum(lr[start + j] / K * grads[j][p] for j in range(K)) for p in range(4)]
    return out[:T], (W[0], W[1][None], W[2], W[3][None])


def np_layer(p, h, *, K, causal, base_lr, gated):
    """The whole TTTMLP (or gated block) in NumPy from a dict of float64 parameters."""
    B, T, D = h.shape
    H, d = p["W1"].shape[0], p["W1"].shape[1]
    proj = {n: (h @ p[f"{n}.kernel"] + p[f"{n}.bias"]).reshape(B, T, H, d) for n in ("wq", "wk", "wv")}
    logits = np.einsum("btc,hc->bth", h, p["learnable_ttt_lr_weight"][:, 0]) + p["learnable_ttt_lr_bias"][:, 0]
    lr = base_lr / (1 + np.exp(-logits)) / d
    out = np.zeros((B, T, H, d))
    for b in range(B):
        for k in range(H):
            out[b, :, k] = np_ttt_head(proj["wq"][b, :, k], proj["wk"][b, :, k], proj["wv"][b, :, k], lr[b, :, k],
                                       p["W1"][k], p["b1"][k], p["W2"][k], p["b2"][k], p["ttt_norm_weight"][k],
                                       p["ttt_norm_bias"][k], K, causal)[0]
    out = out.reshape(B, T, D)
    mu, var = out.mean(-1, keepdims=True), out.var(-1, keepdims=True)
    out = (out - mu) / np.sqrt(var + 1e-6) * p["post_norm.scale"] + p["post_norm.bias"]
    y = out @ p["wo.kernel"] + p["wo.bias"]
    return h + np.tanh(p["gating_alpha"]) * y if gated else y


# ----------------------------------------------------------------------------------------------
# Helpers


def random_head(rng, T, d):
    """Random single-head inputs and state; norms, biases and lr perturbed so none is neutral."""
    xq, xk, xv = (rng.normal(size=(T, d)) for _ in range(3))
    lr = rng.uniform(0.2, 1.0, T)
    return dict(xq=xq, xk=xk, xv=xv, lr=lr,
                w1=rng.normal(size=(d, 4 * d)) / math.sqrt(d), b1=0.1 * rng.normal(size=(1, 4 * d)),
                w2=rng.normal(size=(4 * d, d)) / math.sqrt(4 * d), b2=0.1 * rng.normal(size=(1, d)),
                norm_w=1 + 0.2 * rng.normal(size=d), norm_b=0.2 * rng.normal(size=d))


def head_args(a, dtype):
    return [jnp.asarray(a[k], dtype) for k in ("xq", "xk", "xv", "lr", "w1", "b1", "w2", "b2", "norm_w", "norm_b")]


def param_scale(path: str, shape) -> tuple[float, float]:
    """(mean, std) for randomising a parameter: norm scales near 1, everything else informative."""
    if path.endswith(("post_norm.scale", "ttt_norm_weight")):
        return 1.0, 0.2
    if path.endswith("gating_alpha"):
        return 0.5, 0.2
    if path.endswith(("kernel", "W1", "W2")):
        return 0.0, 1.0 / math.sqrt(shape[-2])
    if path.endswith("learnable_ttt_lr_weight"):
        return 0.0, 0.5
    return 0.0, 0.3


def randomize(model: nnx.Module, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            name = ".".join(str(k) for k in path)
            mean, std = param_scale(name, var.shape)
            var[...] = jnp.asarray(mean + std * rng.normal(size=var.shape), var[...].dtype)


def numpy_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """Flat `name -> float64 array` with the TTTMLP prefix stripped (as np_layer expects)."""
    out = {}
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            name = ".".join(str(k) for k in path)
            out[name.removeprefix("ttt.")] = np.asarray(var[...], np.float64)
    return out


dual = jax.jit(ttt_mlp_dual, static_argnames=("mini_batch_size", "causal", "scan_remat_group"))
primal = jax.jit(ttt_mlp_primal, static_argnames=("mini_batch_size", "causal"))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(graphdef, state, h, form):
    return nnx.merge(graphdef, state)(h, form=form)[0]


def run(module, h, form="dual"):
    """A module's output, jitted (XLA compiles dominate this file's runtime; eager is slower still)."""
    graphdef, state = nnx.split(module)
    return _apply(graphdef, state, h, form)


def make_block(*, D=8, H=2, K=3, causal=True, group=1, dtype=jnp.float32, param_dtype=jnp.float32, seed=0,
               base_lr=1.0, alpha=0.1):
    with nnx.use_eager_sharding(False):  # sharding names stay metadata (no mesh in these tests)
        block = TTTGatedBlock(D, H, initial_gating_alpha=alpha, mini_batch_size=K, base_lr=base_lr,
                              causal=causal, scan_remat_group=group, param_dtype=param_dtype, dtype=dtype,
                              rngs=nnx.Rngs(seed))
    randomize(block, seed)
    return block


# ----------------------------------------------------------------------------------------------
# Core function vs the reference

# (T, K): ragged last mini-batch, T < K, T == K, exact multiple, K = 1; each is one XLA compile.
CORE_CASES = [(13, 4), (3, 4), (4, 4), (8, 4), (5, 1)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T,K", CORE_CASES)
def test_dual_matches_reference_float64(T, K, causal):
    a = random_head(np.random.default_rng(T * 100 + K), T, d=8)
    ref_out, ref_state = np_ttt_head(*a.values(), K, causal)
    with jax.enable_x64(True):
        out, state = dual(*head_args(a, jnp.float64), mini_batch_size=K, causal=causal, scan_remat_group=2)
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out, ref_out, rtol=1e-10, atol=1e-10)
        for got, want in zip(state, ref_state):  # final state after the scan
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
def test_dual_matches_reference_float32(causal):
    # fp32 rounding (~6e-8) amplified by a few matmuls over 4d = 32 terms and two LayerNorms
    # (divisions by std): 1e-5 leaves margin without hiding a maths error (those are >= 1e-3 here).
    a = random_head(np.random.default_rng(1), 13, d=8)
    ref_out, ref_state = np_ttt_head(*a.values(), 4, causal)
    out, state = dual(*head_args(a, jnp.float32), mini_batch_size=4, causal=causal)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(state, ref_state):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_primal_matches_dual_and_reference(causal):
    a = random_head(np.random.default_rng(7), 11, d=8)
    ref_out, ref_state = np_ttt_head(*a.values(), 4, causal)
    with jax.enable_x64(True):
        args = head_args(a, jnp.float64)
        out_p, state_p = primal(*args, mini_batch_size=4, causal=causal)
        out_d, state_d = dual(*args, mini_batch_size=4, causal=causal)
        np.testing.assert_allclose(out_p, out_d, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(out_p, ref_out, rtol=1e-10, atol=1e-10)
        for p, d_, r in zip(state_p, state_d, ref_state):
            np.testing.assert_allclose(p, d_, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(p, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
def test_dual_gradients_match_primal_autodiff(causal):
    """The dual form's hand-written VJP vs JAX autodiff of the primal form, w.r.t. all ten inputs."""
    a = random_head(np.random.default_rng(5), 13, d=8)
    with jax.enable_x64(True):
        args = head_args(a, jnp.float64)
        weights = jax.random.normal(jax.random.key(1), (13, 8), jnp.float64)

        def loss(args, fn):
            out, state = fn(*args, mini_batch_size=4, causal=causal)
            return jnp.sum(weights * out) + sum(jnp.sum(jnp.cos(s)) for s in state)

        got = jax.jit(jax.grad(loss), static_argnums=1)(args, ttt_mlp_dual)
        want = jax.jit(jax.grad(loss), static_argnums=1)(args, ttt_mlp_primal)
        for name, x, y in zip(("xq", "xk", "xv", "lr", "w1", "b1", "w2", "b2", "norm_w", "norm_b"), got, want):
            np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-10, err_msg=name)
            assert np.abs(np.asarray(y)).max() > 1e-3, name  # every input matters


def test_primal_step_streams():
    """Decoding token by token across calls (state carried, mini-batch boundary mid-call) == one pass."""
    a = random_head(np.random.default_rng(6), 11, d=8)
    with jax.enable_x64(True):
        args = head_args(a, jnp.float64)
        want, _ = primal(*args, mini_batch_size=4)
        step = jax.jit(lambda s, tok: primal_step(s, tok, args[8], args[9], mini_batch_size=4))
        state = init_primal_state(*args[4:8])
        outs = []
        for t in range(11):
            state, out = step(state, TTTToken(args[0][t], args[1][t], args[2][t], args[3][t]))
            outs.append(out)
        np.testing.assert_allclose(jnp.stack(outs), want, rtol=1e-12, atol=1e-12)
        assert int(state.pos) == 3  # 11 = 2 * 4 + 3 tokens: two commits, three pending


def test_reference_is_sensitive_to_every_input():
    """Guards the comparisons above: perturbing any input of the reference changes its output."""
    a = random_head(np.random.default_rng(3), 9, d=8)
    base = np_ttt_head(*a.values(), 4, True)[0]
    rng = np.random.default_rng(4)
    for key in a:
        b = dict(a)
        b[key] = a[key] + 0.05 * rng.normal(size=np.shape(a[key]))
        assert np.abs(np_ttt_head(*b.values(), 4, True)[0] - base).max() > 1e-4, key


def test_scan_remat_group_does_not_change_results():
    """Groups of 1, 2, 3 mini-batches (7 mini-batches, padded to 7, 8, 9): same outputs, state, grads.

    float64, so that the comparison is tight (1e-12): in fp32 the differently padded shapes
    round differently (~1e-6).
    """
    a = random_head(np.random.default_rng(4), 27, d=8)
    with jax.enable_x64(True):
        args = head_args(a, jnp.float64)
        weights = jax.random.normal(jax.random.key(0), (27, 8), jnp.float64)

        def loss(args, group):
            out, state = ttt_mlp_dual(*args, mini_batch_size=4, scan_remat_group=group)
            return jnp.sum(weights * out) + sum(jnp.sum(jnp.sin(s)) for s in state), (out, state)

        grad_fn = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
        reference = jax.tree.leaves(grad_fn(args, 1))
        for group in (2, 3):
            for x, y in zip(jax.tree.leaves(grad_fn(args, group)), reference):
                np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)


def test_reversible_backward_is_accurate_in_fp32():
    """The G = 1 backward rebuilds every state from the next one (64 mini-batches here): its fp32
    gradients stay as close to float64 ones as the G = 2 (stored-state) gradients do."""
    a = random_head(np.random.default_rng(9), 256, d=8)
    weights = np.random.default_rng(10).normal(size=(256, 8))

    def grads(dtype, group):
        def loss(args):
            out, state = ttt_mlp_dual(*args, mini_batch_size=4, scan_remat_group=group)
            return jnp.sum(jnp.asarray(weights, dtype) * out) + sum(jnp.sum(jnp.sin(s)) for s in state)

        return [np.asarray(g, np.float64) for g in jax.jit(jax.grad(loss))(head_args(a, dtype))]

    with jax.enable_x64(True):
        exact = grads(jnp.float64, 1)
    for group in (1, 2):
        for got, want in zip(grads(jnp.float32, group), exact):
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_core_casts_bf16_inputs_to_fp32():
    a = random_head(np.random.default_rng(8), 9, d=8)
    args16 = head_args(a, jnp.bfloat16)
    out16, state16 = dual(*args16, mini_batch_size=4)
    out32, _ = dual(*(x.astype(jnp.float32) for x in args16), mini_batch_size=4)
    assert out16.dtype == jnp.float32 and all(s.dtype == jnp.float32 for s in state16)
    np.testing.assert_array_equal(out16, out32)


# ----------------------------------------------------------------------------------------------
# Whole layer


@pytest.mark.parametrize("T,K,H,causal", [(10, 4, 2, True), (3, 5, 4, False)])
def test_layer_matches_reference(T, K, H, causal):
    with jax.enable_x64(True):
        block = make_block(D=8, H=H, K=K, causal=causal, group=2, dtype=jnp.float64, param_dtype=jnp.float64,
                           seed=T + H)
        h = np.random.default_rng(T).normal(size=(2, T, 8))
        want = np_layer(numpy_params(block), h, K=K, causal=causal, base_lr=1.0, gated=True)
        np.testing.assert_allclose(run(block, jnp.asarray(h)), want, rtol=1e-10, atol=1e-10)
        if causal:
            np.testing.assert_allclose(run(block, jnp.asarray(h), "primal"), want, rtol=1e-10, atol=1e-10)


def test_causality():
    """Causal: outputs before frame t ignore frames >= t. Non-causal: they see the rest of their mini-batch."""
    h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 8)), jnp.float32)
    t = 6  # inside mini-batch [4, 8)
    h2 = jnp.concatenate([h[:1], h[1:].at[:, t:].add(1.0)])  # batch element 1 changed, element 0 not
    y, y2 = run(make_block(K=4, causal=True).ttt, h), run(make_block(K=4, causal=True).ttt, h2)
    np.testing.assert_array_equal(y[:, :t], y2[:, :t])
    np.testing.assert_array_equal(y[0], y2[0])  # batch elements are independent
    assert np.abs(y[1, t:] - y2[1, t:]).min() > 0
    y, y2 = run(make_block(K=4, causal=False).ttt, h), run(make_block(K=4, causal=False).ttt, h2)
    np.testing.assert_array_equal(y[:, :4], y2[:, :4])  # earlier mini-batches are still unaffected
    assert np.abs(y[1, 4:t] - y2[1, 4:t]).max() > 1e-3


def _fd_check(module, h):
    """Gradient of a random projection of the output w.r.t. every parameter and the input vs central FD."""
    graphdef, state = nnx.split(module)
    flat, unravel = ravel_pytree((state, h))
    weights = jnp.asarray(np.random.default_rng(1).normal(size=h.shape))

    def loss(v):
        s, x = unravel(v)
        return jnp.sum(weights * nnx.merge(graphdef, s)(x)[0])

    grad = jax.jit(jax.grad(loss))(flat)
    eps = 1e-5
    fd = jax.jit(jax.vmap(lambda e: (loss(flat + e) - loss(flat - e)) / (2 * eps)))(eps * jnp.eye(flat.size))
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8 * float(jnp.abs(grad).max()))
    assert np.count_nonzero(np.asarray(grad)) > 0.95 * grad.size  # every parameter takes part


@pytest.mark.parametrize("gated,causal,group", [(True, True, 1), (False, False, 2)])
def test_gradients_match_finite_differences(gated, causal, group):
    """group 1: the reversible backward pass; group 2: jax.checkpoint-ed groups."""
    with jax.enable_x64(True):
        block = make_block(D=8, H=2, K=3, causal=causal, group=group, dtype=jnp.float64, param_dtype=jnp.float64)
        h = jnp.asarray(np.random.default_rng(2).normal(size=(2, 7, 8)))
        _fd_check(block if gated else block.ttt, h)


def _dot_dtypes(jaxpr, inside_scan=False):
    """(operand dtypes, inside a scan?) for every dot_general of a jaxpr, recursively."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append((tuple(str(v.aval.dtype) for v in eqn.invars), inside_scan))
        for sub in _subjaxprs(eqn):
            found += _dot_dtypes(sub, inside_scan or eqn.primitive.name == "scan")
    return found


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if hasattr(item, "jaxpr") and hasattr(item, "consts"):
                yield item.jaxpr
            elif hasattr(item, "eqns"):
                yield item


def test_bf16_params_keep_fp32_inner_loop():
    block16 = make_block(D=16, H=2, K=4, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    h = jnp.asarray(np.random.default_rng(6).normal(size=(2, 10, 16)), jnp.bfloat16)
    graphdef, state = nnx.split(block16)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x)[0])(state, h)
    assert jaxpr.out_avals[0].dtype == jnp.bfloat16
    dots = _dot_dtypes(jaxpr.jaxpr)
    inner = [dt for dt, in_scan in dots if in_scan]
    assert inner and all(dt == ("float32", "float32") for dt in inner), inner
    assert ("bfloat16", "bfloat16") in [dt for dt, in_scan in dots if not in_scan]  # the projections
    # The same bf16-rounded weights and input, fp32 everywhere: only bf16 projections/output differ.
    y16 = run(block16, h)
    block32 = make_block(D=16, H=2, K=4)
    nnx.update(block32, jax.tree.map(lambda a: a.astype(jnp.float32), state))
    y32 = run(block32, h.astype(jnp.float32))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=0.05, atol=0.05)


def test_zero_gate_is_identity():
    block = make_block(alpha=0.0)
    block.gating_alpha[...] = jnp.zeros_like(block.gating_alpha[...])
    h = jnp.asarray(np.random.default_rng(9).normal(size=(2, 9, 8)), jnp.float32)
    np.testing.assert_array_equal(run(block, h), h)


# ----------------------------------------------------------------------------------------------
# Parameters: names, shapes, sharding names, init


def test_parameter_contract():
    D, H = 16, 4
    d = D // H
    with nnx.use_eager_sharding(False):
        block = TTTGatedBlock(D, H, initial_gating_alpha=0.1, mini_batch_size=4, base_lr=1.0, causal=True,
                              scan_remat_group=1, param_dtype=jnp.float32, dtype=jnp.float32, rngs=nnx.Rngs(0))
    want = {
        "gating_alpha": ((D,), ("embed",)),
        "ttt.W1": ((H, d, 4 * d), ("ttt_heads", "ttt_head_dim", "ttt_hidden")),
        "ttt.b1": ((H, 1, 4 * d), ("ttt_heads", None, "ttt_hidden")),
        "ttt.W2": ((H, 4 * d, d), ("ttt_heads", "ttt_hidden", "ttt_head_dim")),
        "ttt.b2": ((H, 1, d), ("ttt_heads", None, "ttt_head_dim")),
        "ttt.learnable_ttt_lr_weight": ((H, 1, D), ("ttt_heads", None, "embed")),
        "ttt.learnable_ttt_lr_bias": ((H, 1), ("ttt_heads", None)),
        "ttt.ttt_norm_weight": ((H, d), ("ttt_heads", "ttt_head_dim")),
        "ttt.ttt_norm_bias": ((H, d), ("ttt_heads", "ttt_head_dim")),
        "ttt.post_norm.scale": ((D,), ("embed",)),
        "ttt.post_norm.bias": ((D,), ("embed",)),
        "ttt.wo.kernel": ((D, D), ("heads", "embed")),
        "ttt.wo.bias": ((D,), ("embed",)),
    }
    for n in ("wq", "wk", "wv"):
        want[f"ttt.{n}.kernel"] = ((D, D), ("embed", "heads"))
        want[f"ttt.{n}.bias"] = ((D,), ("heads",))
    got = {".".join(str(k) for k in path): var for path, var in nnx.iter_graph(block) if isinstance(var, nnx.Param)}
    assert sorted(got) == sorted(want)
    for name, (shape, names) in want.items():
        assert got[name].shape == shape, name
        assert tuple(got[name].get_metadata()["out_sharding"]) == names, name
        value = np.asarray(got[name][...])
        if name.endswith(("kernel", "W1", "W2", "lr_weight")):
            assert abs(value.std() - 0.02) < 0.005 and abs(value.mean()) < 0.005, name
        elif name.endswith(("scale", "norm_weight")):
            np.testing.assert_array_equal(value, 1.0)
        elif name == "gating_alpha":
            np.testing.assert_allclose(value, 0.1)
        else:
            np.testing.assert_array_equal(value, 0.0)


# ----------------------------------------------------------------------------------------------
# Config parsing and validation


def test_parse_ttt_layers():
    assert parse_ttt_layers("1,5,10", 32) == (1, 5, 10)
    assert parse_ttt_layers(" 10, 1 ", 32) == (1, 10)
    assert parse_ttt_layers("all", 4) == (0, 1, 2, 3)
    assert parse_ttt_layers("middle", 32) == tuple(range(8, 24))
    assert parse_ttt_layers("middle", 6) == (1, 2, 3)
    assert parse_ttt_layers("none", 32) == () and parse_ttt_layers("", 32) == ()
    for bad in ("32", "-1", "1,1", "1,x", "1.5", "1,,2"):
        with pytest.raises(ValueError, match=r"ttt.layers=.*num_layers=32"):
            parse_ttt_layers(bad, 32)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mini_batch_size=0), "mini_batch_size=0"),
    (dict(scan_remat_group=0), "scan_remat_group=0"),
    (dict(num_heads=3), "num_heads=3 does not divide dim=8"),
])
def test_validation_errors(kwargs, match):
    args = dict(dim=8, num_heads=2, mini_batch_size=4, base_lr=1.0, scan_remat_group=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        TTTMLP(args.pop("dim"), args.pop("num_heads"), rngs=nnx.Rngs(0), **args)
    if "num_heads" not in kwargs:
        a = random_head(np.random.default_rng(0), 4, d=4)
        with pytest.raises(ValueError, match=match):
            ttt_mlp_dual(*head_args(a, jnp.float32), mini_batch_size=args["mini_batch_size"],
                         scan_remat_group=args["scan_remat_group"])
