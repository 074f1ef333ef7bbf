"""Per-layer rematerialisation (config `remat`, model/transformer.py): `save_qkv` trains the same
model as no remat, and keeps exactly the q/k/v projections for the backward.

Tolerance: fp32 throughout, the same ops recomputed (XLA fuses the recompute differently): loss
and gradients within 1e-5 relative to remat=none (the size of the actual differences was not recorded).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import micro
from tttjax.config import reader
from tttjax.model.config import from_run_config
from tttjax.model.moshi import create_model
from tttjax.model.transformer import QKV_PROJ, apply_layer, layer_at


def _model(remat: str):
    config = reader.load("configs/tiny.py", reader.split_config_args(micro.cli(remat=remat))[1])
    return create_model(from_run_config(config), seed=3)


def _codes(cfg, batch=2, frames=12):
    return jax.random.randint(jax.random.key(0), (batch, cfg.num_codebooks, frames), 0, cfg.card)


def _loss_and_grads(remat: str):
    model = _model(remat)
    graphdef, params = nnx.split(model)
    codes = _codes(model.cfg)

    def loss(params):  # every logit matters, through a nonlinearity
        out = nnx.merge(graphdef, params).predictions(codes)
        return jnp.mean(jnp.tanh(out.text_logits)) + jnp.mean(jnp.tanh(out.logits) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), [np.asarray(g) for g in jax.tree.leaves(grads)]


def test_save_qkv_gives_the_loss_and_gradients_of_none():
    """The whole model (scanned plain layers, a TTT layer outside the scan, the depformer's scan)."""
    loss, grads = _loss_and_grads("none")
    assert any(np.abs(g).max() > 0 for g in grads)
    other_loss, other = _loss_and_grads("save_qkv")
    np.testing.assert_allclose(other_loss, loss, rtol=1e-5)
    for a, b in zip(other, grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max() + 1e-12)


@pytest.mark.parametrize("remat, named", [("save_qkv", 4), ("full", 0), ("dots", 0)])
def test_save_qkv_keeps_the_qkv_projections_of_a_ttt_layer(remat, named, capsys):
    """A TTT layer under save_qkv keeps attention's in_proj output and the TTT branch's wq/wk/wv
    outputs (four residuals named qkv_proj), so its backward reuses no recomputed projection."""
    model = _model(remat)
    layer, ttt = layer_at(model.transformer, model.cfg.ttt_layers[0]), layer_at(model.ttt, 0)
    graphdef, state = nnx.split((layer, ttt))
    x = jax.random.normal(jax.random.key(1), (2, 12, model.cfg.dim))

    def run(state, x):
        layer, ttt = nnx.merge(graphdef, state)
        return jnp.sum(apply_layer(layer, x, ttt=ttt, remat=remat))

    jax.ad_checkpoint.print_saved_residuals(run, state, x)
    printed = capsys.readouterr().out
    assert printed.count(f"named '{QKV_PROJ}'") == named, printed
