"""Whole-sequence attention implementations (tttjax/model/attention.py) against the full-score path.

The full-score path (`xla`) is itself checked against moshi (tests/test_moshi_parity.py,
tests/test_long_attention.py). Tolerances: fp32 outputs and gradients within 1e-5 (the
implementations differ in summation order and in where the softmax is normalised; observed
<= 4e-6 on O(1) values); bf16 inputs within 2e-2 (probabilities are rounded to bf16 before the
value matmul on both sides, at different points of the computation: ~3 bf16 ulps of an O(1) output).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tttjax.model import attention as A

REPO = Path(__file__).resolve().parents[1]
CASES = [  # (B, T, H, d, context): T > context, T = context, no window, T not a multiple of any block
    (2, 37, 3, 8, 5),
    (1, 300, 2, 16, 64),
    (1, 130, 2, 8, 17),
    (2, 64, 2, 8, 64),
    (1, 90, 2, 8, None),
]
IMPLS = {
    "blockwise": A.blockwise_attention,
    "blockwise_small_blocks": lambda q, k, v, c: A.blockwise_attention(q, k, v, c, block_frames=8),
    "splash": A.splash_attention,  # Pallas interpret mode on CPU
    "cudnn_window": lambda q, k, v, c: A.cudnn_attention(q, k, v, c, implementation=None),  # the window mapping
}


def qkv(B, T, H, d, dtype=jnp.float32, seed=0):
    return tuple(jax.random.normal(k, (B, T, H, d)).astype(dtype) for k in jax.random.split(jax.random.key(seed), 3))


def loss(attend, context):
    """A scalar whose gradient weighs every output feature differently."""
    def f(q, k, v):
        weights = jnp.sin(jnp.arange(1, q.shape[-1] + 1, dtype=jnp.float32))
        return (attend(q, k, v, context).astype(jnp.float32) * weights).sum()
    return f


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}H{}d{}c{}".format(*c))
@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_matches_full_scores_with_gradients(impl, case):
    B, T, H, d, context = case
    q, k, v = qkv(B, T, H, d)
    attend = IMPLS[impl]
    want = A.full_attention(q, k, v, context)
    np.testing.assert_allclose(attend(q, k, v, context), want, atol=1e-5, rtol=0)
    got_grads = jax.grad(loss(attend, context), argnums=(0, 1, 2))(q, k, v)
    want_grads = jax.grad(loss(A.full_attention, context), argnums=(0, 1, 2))(q, k, v)
    for name, got, ref in zip("qkv", got_grads, want_grads):
        assert float(jnp.abs(ref).max()) > 1e-2, name  # the gradient is not trivially zero
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_window_is_moshis_context():
    """The window holds exactly `context` keys: changing a key `context` frames back changes nothing."""
    q, k, v = qkv(1, 40, 1, 8)
    context = 7
    moved = v.at[:, 32].set(100.0)  # frame 32 is seen by queries 32..38, not by 39
    for name, attend in IMPLS.items():
        a, b = attend(q, k, v, context), attend(q, k, moved, context)
        changed = np.flatnonzero(np.abs(np.asarray(a - b)).max(axis=(0, 2, 3)) > 0)
        assert list(changed) == list(range(32, 39)), name


@pytest.mark.parametrize("impl", ["blockwise", "splash"])
def test_bf16(impl):
    q, k, v = qkv(2, 200, 2, 16, jnp.bfloat16, seed=1)
    got = IMPLS[impl](q, k, v, 24)
    assert got.dtype == jnp.bfloat16
    want = A.full_attention(q, k, v, 24)
    diff = float(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)).max())
    assert diff < 2e-2, diff
    got_g = jax.grad(loss(IMPLS[impl], 24))(q, k, v)
    want_g = jax.grad(loss(A.full_attention, 24))(q, k, v)
    scale = float(jnp.abs(want_g.astype(jnp.float32)).max())
    assert float(jnp.abs(got_g.astype(jnp.float32) - want_g.astype(jnp.float32)).max()) < 2e-2 * scale


def test_resolve_impl():
    assert A.resolve_impl("auto", "tpu", 50) == "splash"
    assert A.resolve_impl("auto", "gpu", 50_000, jnp.bfloat16) == "cudnn"
    assert A.resolve_impl("auto", "gpu", 50_000, jnp.float32) == "blockwise"  # cuDNN takes half precision only
    assert A.resolve_impl("auto", "cpu", A.AUTO_BLOCKWISE_MIN_FRAMES) == "xla"
    assert A.resolve_impl("auto", "cpu", A.AUTO_BLOCKWISE_MIN_FRAMES + 1) == "blockwise"
    assert A.resolve_impl("splash", "cpu", 10) == "splash"
    with pytest.raises(ValueError, match="model.attention_impl='flash': expected one of auto, xla, blockwise"):
        A.resolve_impl("flash", "cpu", 10)


def test_auto_follows_the_mesh_platform():
    """Under an AOT compile for TPU on this CPU host, `auto` means splash: the platform is the mesh's."""
    topologies = pytest.importorskip("jax.experimental.topologies")
    topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    mesh = jax.sharding.Mesh(np.array(topo.devices), ("data",))
    seen = []

    @jax.jit
    def probe(x):
        seen.append(A.current_platform())
        return x

    assert A.current_platform() == "cpu"
    with jax.set_mesh(mesh):
        probe.trace(jax.ShapeDtypeStruct((4,), jnp.float32))
    assert seen == ["tpu"]


# -- no T x T array in the compiled program ----------------------------------------------------------

def square_shapes(hlo: str, frames: int) -> list[str]:
    """Array shapes in HLO text with two dimensions of at least `frames` (a T x T score in any layout)."""
    shapes = re.findall(r"\b(?:f32|bf16|f16|pred|s32)\[([0-9,]+)\]", hlo)
    return sorted({s for s in shapes if sum(int(n) >= frames for n in s.split(",")) >= 2})


def grad_program(attend, T, context, dtype=jnp.float32):
    spec = jax.ShapeDtypeStruct((1, T, 2, 16), dtype)
    return jax.jit(jax.grad(loss(attend, context), argnums=(0, 1, 2))).lower(spec, spec, spec)


def test_blockwise_program_has_no_txt_array():
    T, context = 1024, 100
    assert square_shapes(grad_program(A.full_attention, T, context).compile().as_text(), T)  # the check can fail
    assert square_shapes(grad_program(A.blockwise_attention, T, context).compile().as_text(), T) == []


def test_splash_compiles_for_tpu_without_txt_array():
    """The real Mosaic kernel (not the interpreter) for a v5e:2x2 mesh, batch and heads sharded."""
    topologies = pytest.importorskip("jax.experimental.topologies")
    topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    mesh = jax.sharding.Mesh(np.array(topo.devices).reshape(2, 1, 2), ("data", "fsdp", "tensor"))
    T, context = 4096, 3000
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor"))
    spec = jax.ShapeDtypeStruct((2, T, 4, 128), jnp.bfloat16, sharding=sharding)
    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss(A.splash_attention, context), argnums=(0, 1, 2))).lower(
            spec, spec, spec).compile()
    hlo = compiled.as_text()
    assert "tpu_custom_call" in hlo  # the Pallas kernel, compiled by Mosaic
    assert square_shapes(hlo, T) == []


# -- splash sharded by shard_map over a 4-device CPU mesh (a subprocess: XLA_FLAGS before JAX starts) ---

def _sharded_child():
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 1, 2), ("data", "fsdp", "tensor"))  # as make_mesh
    q, k, v = qkv(4, 100, 4, 8)
    want = A.full_attention(q, k, v, 9)
    want_grads = jax.grad(loss(A.full_attention, 9), argnums=(0, 1, 2))(q, k, v)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda q, k, v: A.splash_attention(q, k, v, 9))(q, k, v)
        grads = jax.jit(jax.grad(loss(A.splash_attention, 9), argnums=(0, 1, 2)))(q, k, v)
        hlo = jax.jit(lambda q, k, v: A.splash_attention(q, k, v, 9)).lower(q, k, v).as_text()
    assert "shard_map" in hlo or "sdy.manual_computation" in hlo, "splash did not run under shard_map"
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
    print("sharded splash ok")


def test_splash_sharded_over_batch_and_heads():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    done = subprocess.run([sys.executable, "-c", "import test_attention as t; t._sharded_child()"], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "sharded splash ok" in done.stdout, done.stdout + done.stderr[-3000:]
