"""A full Moshi with TTT layers: import, forward, export, and the PyTorch loader (conversion/torch_ttt.py).

Tolerance: fp32 logits within 1e-4 (the TTT inner loop adds a few fp32 matmuls per mini-batch on
both sides; observed ~1e-6).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_reference as ref
from flax import nnx
from test_moshi_parity import assert_parity, flax_forward

from conversion.to_pytorch import main as to_pytorch_main
from conversion.torch_ttt import load_ttt_moshi
from tttjax.checkpoint.model_dir import save_model
from tttjax.weights.pytorch import load_pytorch

TTT = {"enable": True, "layers": "0,2", "base_lr": 1.0, "mini_batch_size": 4, "causal": True,
       "initial_gating_alpha": 0.1}


def randomize_ttt(model, seed=0, scale=0.3):
    """Random TTT weights and gates (not the init), so every TTT tensor matters in a comparison."""
    state = nnx.state(model.ttt, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(model.ttt, jax.tree.unflatten(treedef, new))


def with_fresh_ttt(weights, config, lora=None):
    """The base weights in a model with freshly initialised TTT layers (as training starts)."""
    from tttjax.model.config import from_config_json
    from tttjax.model.moshi import create_model
    from tttjax.model.params import is_ttt
    from tttjax.weights.sources import ModelSource, copy_into

    data = json.loads(config.read_text())
    base_json = ref.save_config(config.with_name("base.json"), {k: v for k, v in data.items() if k != "ttt"})
    base = load_pytorch(weights, base_json, lora=lora)
    model = create_model(from_config_json(data, lora_rank=base.cfg.lora_rank))
    copy_into(model, ModelSource(base), source_name=str(weights), allow_missing=is_ttt)
    return model


def ttt_model(tmp_path, kwargs, ttt, lora_rank=0):
    lm = ref.build_lm(kwargs, lora_rank=lora_rank)
    sd = ref.state_dict_numpy(lm)
    extra = dict(lora=True, lora_rank=lora_rank, lora_scaling=2.0) if lora_rank else {}
    weights = ref.save_safetensors(tmp_path / "w.safetensors", {k: v for k, v in sd.items() if ".lora_" not in k})
    lora = ref.save_safetensors(tmp_path / "l.safetensors", {k: v for k, v in sd.items() if ".lora_" in k}) \
        if lora_rank else None
    config = ref.save_config(tmp_path / "config.json", kwargs, ttt=ttt, **extra)
    return lm, weights, config, lora


@pytest.mark.parametrize("causal", [True, False])
def test_ttt_model_matches_pytorch_loader(tmp_path, causal):
    kwargs = ref.lm_kwargs(num_layers=3)
    ttt = dict(TTT, causal=causal)
    lm, weights, config, _ = ttt_model(tmp_path, kwargs, ttt)
    model = with_fresh_ttt(weights, config)
    assert model.cfg.ttt_layers == (0, 2) and model.cfg.ttt_causal == causal
    randomize_ttt(model)
    save_model(tmp_path / "ckpt", model)
    assert to_pytorch_main(["--checkpoint_dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "e"),
                            "--dtype", "float32"]) == 0
    exported_cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    assert exported_cfg["ttt"]["layers"] == "0,2" and exported_cfg["ttt"]["causal"] == causal
    torch_lm = load_ttt_moshi(tmp_path / "e" / "consolidated.safetensors", tmp_path / "e" / "config.json")
    codes = ref.random_codes(kwargs, batch=2, frames=10, seed=4)  # 10 frames: not a multiple of K = 4
    want = ref.torch_forward(torch_lm, codes)
    got = flax_forward(model, codes)
    assert_parity(got, want)
    # The TTT branch matters: the plain moshi model gives different logits.
    plain = ref.torch_forward(lm, codes)
    assert np.abs(plain["logits"] - want["logits"])[want["mask"]].max() > 1e-3
    # Import of the exported TTT checkpoint gives the same model back.
    again = load_pytorch(tmp_path / "e" / "consolidated.safetensors", tmp_path / "e" / "config.json")
    assert_parity(flax_forward(again, codes), want)
    # PyTorch TTT-Moshi checkpoints also carry backward_ssm_gating and a duplicated original_layer:
    # ignored (their garbage values would change the logits if any were used).
    from tttjax.weights import safetensors_io

    tensors = safetensors_io.load(tmp_path / "e" / "consolidated.safetensors")
    block = "transformer.layers.0.seq_modeling_block"
    tensors[f"{block}.backward_ssm_gating.gating_alpha"] = np.full_like(
        tensors[f"{block}.forward_ssm_gating.gating_alpha"], 7.0)
    for name in [n for n in tensors if n.startswith("transformer.layers.0.") and "seq_modeling_block" not in n]:
        tensors[name.replace("transformer.layers.0.", "transformer.layers.0.original_layer.")] = \
            np.full_like(tensors[name], 3.0)
    safetensors_io.save(tmp_path / "with_extra.safetensors", tensors)
    extra = load_pytorch(tmp_path / "with_extra.safetensors", tmp_path / "e" / "config.json")
    assert_parity(flax_forward(extra, codes), want)


def test_adapters_export_with_ttt_and_lora(tmp_path):
    kwargs = ref.lm_kwargs(num_layers=3)
    _, weights, config, lora = ttt_model(tmp_path, kwargs, TTT, lora_rank=2)
    model = with_fresh_ttt(weights, config, lora=lora)
    randomize_ttt(model, seed=3)
    save_model(tmp_path / "ckpt", model)
    assert to_pytorch_main(["--checkpoint_dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "a"),
                            "--adapters_only", "--dtype", "float32"]) == 0
    from safetensors.numpy import load_file

    names = set(load_file(str(tmp_path / "a" / "lora.safetensors")))
    assert {n for n in names if "seq_modeling_block" in n} == {
        f"transformer.layers.{l}.seq_modeling_block.{t}" for l in (0, 2) for t in
        ["forward_ssm_gating.gating_alpha"] + [f"ttt_layer.ttt.{p}" for p in (
            "W1", "b1", "W2", "b2", "learnable_ttt_lr_weight", "learnable_ttt_lr_bias", "ttt_norm_weight",
            "ttt_norm_bias", "post_norm.weight", "post_norm.bias", "wq.weight", "wq.bias", "wk.weight", "wk.bias",
            "wv.weight", "wv.bias", "wo.weight", "wo.bias")]}
    torch_lm = load_ttt_moshi(weights, tmp_path / "a" / "config.json", lora=tmp_path / "a" / "lora.safetensors")
    codes = ref.random_codes(kwargs, batch=1, frames=9, seed=2)
    want = ref.torch_forward(torch_lm, codes)
    assert_parity(flax_forward(model, codes), want)
    # config.json's contents as a dict (what json.load gives, as for moshi's get_moshi_lm) load the same
    # model, and the dict is left as it was.
    config_dict = json.loads((tmp_path / "a" / "config.json").read_text())
    before = json.dumps(config_dict, sort_keys=True)
    from_dict = load_ttt_moshi(weights, config_dict, lora=tmp_path / "a" / "lora.safetensors")
    got = ref.torch_forward(from_dict, codes)
    np.testing.assert_array_equal(got["logits"][got["mask"]], want["logits"][want["mask"]])
    assert json.dumps(config_dict, sort_keys=True) == before and config_dict["ttt"]["layers"] == "0,2"
    with pytest.raises(TypeError, match=r"^config: expected the path of a config.json or its contents as a dict, "
                                        r"got list$"):
        load_ttt_moshi(weights, [config_dict])


def test_zero_gate_equals_plain_moshi(tmp_path):
    kwargs = ref.lm_kwargs(num_layers=3)
    lm, weights, config, _ = ttt_model(tmp_path, kwargs, dict(TTT, initial_gating_alpha=0.0))
    model = with_fresh_ttt(weights, config)
    randomize_ttt(model)
    nnx.update(model.ttt, {"gating_alpha": jnp.zeros_like(model.ttt.gating_alpha[...])})
    plain = load_pytorch(weights, ref.save_config(tmp_path / "plain.json", kwargs))
    codes = jnp.asarray(ref.random_codes(kwargs, batch=2, frames=8))
    a, b = flax_forward(model, codes), flax_forward(plain, codes)
    for key in ("logits", "text_logits"):
        np.testing.assert_array_equal(a[key], b[key])


def test_missing_ttt_tensors_are_named(tmp_path):
    kwargs = ref.lm_kwargs(num_layers=3)
    _, weights, config, _ = ttt_model(tmp_path, kwargs, TTT)
    from tttjax.weights.pytorch import ConversionError

    with pytest.raises(ConversionError, match=r"missing keys \[.*transformer.layers.0.seq_modeling_block"):
        load_pytorch(weights, config)


def test_bad_ttt_specs_fail_clearly(tmp_path):
    kwargs = ref.lm_kwargs(num_layers=3)
    for ttt, message in ((dict(TTT, layers="0,3"), r"\(num_layers=3\): layer indices \[3\] out of range"),
                         (dict(TTT, mini_batch_size=0), r"ttt.mini_batch_size=0 must be >= 1"),
                         (dict(TTT, layers="1,x"), r"expected comma-separated layer indices")):
        _, weights, config, _ = ttt_model(tmp_path, kwargs, ttt)
        with pytest.raises(ValueError, match=message):
            with_fresh_ttt(weights, config)
