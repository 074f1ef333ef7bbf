"""The Flax Moshi LM against the real `moshi` package: same weights, same codes, same logits and masks.

Tolerance: fp32 logits agree to max |diff| < 1e-4 on masked positions (docs/contract.md §3); the two
implementations differ only in summation order (observed ~2e-6). bf16 params: the stored weights
are rounded to bf16 on both sides; compute stays fp32, so the diff stays at fp32 level.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_reference as ref
from flax import nnx

from conversion.from_pytorch import main as from_pytorch_main
from conversion.to_pytorch import main as to_pytorch_main
from tttjax.checkpoint.model_dir import save_model
from tttjax.weights.loader import load_model
from tttjax.weights.pytorch import ConversionError, load_pytorch
from tttjax.weights.safetensors_io import SafetensorsError

CONFIGS = {
    "small": ref.lm_kwargs(),
    "context_lt_T": ref.lm_kwargs(context=5, num_heads=8, num_layers=3),
    "wide_depformer": ref.lm_kwargs(dim=48, num_heads=3, depformer_dim=40, depformer_num_heads=4,
                                    depformer_num_layers=1, depformer_dim_feedforward=160, hidden_scale=4),
    "fewer_steps": ref.lm_kwargs(n_q=8, dep_q=4, delays=[0, 0, 2, 2, 2, 0, 1, 1, 1]),
}


def flax_forward(model, codes):
    out = nnx.jit(lambda m, c: m(c))(model, jnp.asarray(codes))
    return {k: np.asarray(v) for k, v in out._asdict().items()}


def assert_parity(got, want, tol=1e-4):
    np.testing.assert_array_equal(got["mask"], want["mask"])
    np.testing.assert_array_equal(got["text_mask"], want["text_mask"])
    assert got["mask"].sum() > 0 and not got["mask"].all()
    for key, mask in (("logits", want["mask"]), ("text_logits", want["text_mask"])):
        diff = np.abs(got[key] - want[key])[mask]
        assert diff.max() < tol, f"{key}: max abs diff {diff.max()}"
        # NaN exactly where moshi puts NaN (the delayed tail).
        np.testing.assert_array_equal(np.isnan(got[key]), np.isnan(want[key]))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("layout", ["moshi", "release"])
def test_logits_match_moshi(tmp_path, name, layout):
    kwargs = CONFIGS[name]
    lm = ref.build_lm(kwargs, seed=len(name))
    sd = ref.state_dict_numpy(lm)
    if layout == "release":
        sd = ref.to_release_layout(sd)
        assert any(k.endswith("in_proj_weight") for k in sd)
    weights = ref.save_safetensors(tmp_path / "w.safetensors", sd)
    config = ref.save_config(tmp_path / "config.json", kwargs)
    codes = ref.random_codes(kwargs, batch=2, frames=12, seed=3)
    model = load_pytorch(weights, config, unroll_layers=layout == "release")  # both layer loops, same numbers
    assert_parity(flax_forward(model, codes), ref.torch_forward(lm, codes))


def test_lora_adapters_and_merged_match_moshi(tmp_path):
    kwargs = CONFIGS["small"]
    lm = ref.build_lm(kwargs, lora_rank=4, lora_scaling=2.0)
    sd = ref.state_dict_numpy(lm)
    base = {k: v for k, v in sd.items() if ".lora_" not in k}
    lora = {k: v for k, v in sd.items() if ".lora_" in k}
    assert lora and all(".frozen_W." in k for k in base if k.endswith("weight") and "emb" not in k
                        and "alpha" not in k)
    weights = ref.save_safetensors(tmp_path / "w.safetensors", base)
    lora_file = ref.save_safetensors(tmp_path / "lora.safetensors", lora)
    config = ref.save_config(tmp_path / "config.json", kwargs, lora=True, lora_rank=4, lora_scaling=2.0)
    codes = ref.random_codes(kwargs, batch=2, frames=10, seed=1)
    want = ref.torch_forward(lm, codes)
    model = load_pytorch(weights, config, lora=lora_file)
    assert model.cfg.lora_rank == 4
    assert_parity(flax_forward(model, codes), want)
    # Merging LoRA into the base kernels (the full export) leaves the function unchanged.
    save_model(tmp_path / "ckpt", model)
    assert to_pytorch_main(["--checkpoint_dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "merged"),
                            "--dtype", "float32"]) == 0
    merged = load_pytorch(tmp_path / "merged" / "consolidated.safetensors", tmp_path / "merged" / "config.json")
    assert merged.cfg.lora_rank == 0
    assert_parity(flax_forward(merged, codes), want)
    # Without the adapters the model is a different function (the test above could fail).
    plain = load_pytorch(weights, config)
    assert plain.cfg.lora_rank == 0
    diff = np.abs(flax_forward(plain, codes)["logits"] - want["logits"])[want["mask"]]
    assert diff.max() > 1e-3


def test_bf16_params(tmp_path):
    kwargs = CONFIGS["small"]
    lm = ref.build_lm(kwargs)
    weights = ref.save_safetensors(tmp_path / "w.safetensors", ref.state_dict_numpy(lm), dtype=ref.torch.bfloat16)
    config = ref.save_config(tmp_path / "config.json", kwargs)
    model = load_pytorch(weights, config, dtype="float32")
    assert model.cfg.param_dtype == "bfloat16"
    assert model.text_emb[...].dtype == jnp.bfloat16
    # moshi with the same bf16-rounded weights, computing in fp32.
    lm_rounded = ref.build_lm(kwargs)
    lm_rounded.load_state_dict({k: v.to(ref.torch.bfloat16).float() for k, v in lm.state_dict().items()})
    codes = ref.random_codes(kwargs, batch=2, frames=8, seed=5)
    assert_parity(flax_forward(model, codes), ref.torch_forward(lm_rounded, codes))
    # bf16 compute: a stated looser bound (bf16 has 8 bits of mantissa; logits are O(1)-O(10)).
    model_bf16 = load_pytorch(weights, config, dtype="bfloat16")
    got = flax_forward(model_bf16, codes)
    want = ref.torch_forward(lm_rounded, codes)
    assert np.abs(got["logits"] - want["logits"])[want["mask"]].max() < 0.25


def test_gradients_are_finite_with_masked_tail():
    from tttjax.model.config import from_lm_kwargs
    from tttjax.model.moshi import create_model

    kwargs = CONFIGS["small"]
    model = create_model(from_lm_kwargs(kwargs))
    codes = jnp.asarray(ref.random_codes(kwargs, batch=2, frames=8))

    def loss(model):
        out = model(codes)
        logits = jnp.where(out.mask[..., None], out.logits, 0.0)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -(jnp.take_along_axis(logp, jnp.maximum(codes[:, 1:9], 0)[..., None], -1)[..., 0] * out.mask).sum()

    grads = nnx.jit(nnx.grad(loss))(model)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)


def test_unrolled_layers_give_the_scanned_gradients():
    """unroll_layers only changes how the stacks are traced: around a TTT layer (segments [0, 1),
    TTT at 1, [2, 3)) and in the depformer, the loss and every gradient match the lax.scan model
    to fp32 reordering (rtol 1e-5, atol 1e-6 on gradients of O(1e-2)-O(1))."""
    import dataclasses

    from tttjax.model.config import from_lm_kwargs
    from tttjax.model.moshi import create_model

    kwargs = ref.lm_kwargs(num_layers=3)
    cfg = from_lm_kwargs(kwargs, ttt_layers=(1,), ttt_mini_batch_size=4, lora_rank=2)
    codes = jnp.asarray(ref.random_codes(kwargs, batch=2, frames=8))
    mask_some = codes.at[0, 3, 2].set(-1)  # a no-token id in an audio stream: its embedding is exactly zero

    def loss(model):
        out = model(mask_some)
        logits = jnp.where(out.mask[..., None], out.logits, 0.0)
        return (jax.nn.logsumexp(logits, axis=-1) * out.mask).sum() + jnp.nansum(out.text_logits ** 2) * 1e-3

    results = []
    for unroll in (False, True):
        model = create_model(dataclasses.replace(cfg, unroll_layers=unroll))
        results.append(nnx.jit(nnx.value_and_grad(loss))(model))
    (scanned, g_scanned), (unrolled, g_unrolled) = results
    np.testing.assert_allclose(unrolled, scanned, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_unrolled), jax.tree.leaves(g_scanned)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert sum(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_scanned)) > 20


def test_cli_import_and_errors(tmp_path, capsys):
    kwargs = CONFIGS["small"]
    lm = ref.build_lm(kwargs)
    sd = ref.state_dict_numpy(lm)
    weights = ref.save_safetensors(tmp_path / "w.safetensors", sd)
    config = ref.save_config(tmp_path / "config.json", kwargs)
    out = tmp_path / "ckpt"
    assert from_pytorch_main(["--weights", str(weights), "--config", str(config), "--out", str(out)]) == 0
    codes = ref.random_codes(kwargs, batch=1, frames=9)
    assert_parity(flax_forward(load_model(out), codes), ref.torch_forward(lm, codes))
    # Never overwrite an existing checkpoint.
    assert from_pytorch_main(["--weights", str(weights), "--config", str(config), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    # Missing / unexpected / wrong-shape keys are named.
    broken = dict(sd)
    del broken["out_norm.alpha"]
    broken["extra.weight"] = np.zeros(3, np.float32)
    broken["text_emb.weight"] = np.zeros((5, 64), np.float32)
    with pytest.raises(ConversionError, match=r"missing keys \['out_norm.alpha'\].*unexpected keys "
                                              r"\['extra.weight'\].*text_emb.weight \(5, 64\)"):
        load_pytorch(ref.save_safetensors(tmp_path / "b.safetensors", broken), config)
    # A config that does not match the weights.
    wrong_cfg = ref.save_config(tmp_path / "wrong.json", dict(kwargs, num_layers=3))
    with pytest.raises(ConversionError, match="missing keys.*transformer.layers.2"):
        load_pytorch(weights, wrong_cfg)
    # Truncated files: inside the header, and inside the data (found from the header, before reading).
    data = weights.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:1000])
    with pytest.raises(SafetensorsError, match=r"t.safetensors: header length \d+ does not fit the file's 1000 bytes"):
        load_pytorch(tmp_path / "t.safetensors", config)
    (tmp_path / "d.safetensors").write_bytes(data[:-10])
    with pytest.raises(SafetensorsError, match=r"d.safetensors: truncated: tensor '.*' ends at byte"):
        load_pytorch(tmp_path / "d.safetensors", config)
    assert from_pytorch_main(["--weights", str(tmp_path / "d.safetensors"), "--config", str(config),
                              "--out", str(tmp_path / "never")]) == 1
    assert "truncated" in capsys.readouterr().err and not (tmp_path / "never").exists()
    # An unsupported option is refused by name.
    with pytest.raises(ValueError, match="norm='layer_norm' is not supported"):
        load_pytorch(weights, ref.save_config(tmp_path / "ln.json", dict(kwargs, norm="layer_norm")))


def test_7b_parameter_count_without_allocating():
    from tttjax.model.config import MOSHI_7B_LM_KWARGS, from_lm_kwargs
    from tttjax.model.moshi import abstract_model

    model = abstract_model(from_lm_kwargs(MOSHI_7B_LM_KWARGS))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    from moshi.models import loaders

    # moshi's own 7B built on the meta device (no memory): 7,687,729,152 parameters.
    lm = loaders.get_moshi_lm(None, lm_kwargs=loaders._lm_kwargs, device="meta", dtype=ref.torch.bfloat16)
    expected = sum(p.numel() for p in lm.parameters())
    assert expected == 7_687_729_152
    assert sum(int(np.prod(x.shape)) for x in leaves) == expected


def test_forward_cli_writes_moshi_logits(tmp_path, capsys):
    from tttjax.forward import main as forward_main

    kwargs = CONFIGS["context_lt_T"]
    lm = ref.build_lm(kwargs, seed=7)
    weights = ref.save_safetensors(tmp_path / "w.safetensors", ref.to_release_layout(ref.state_dict_numpy(lm)))
    config = ref.save_config(tmp_path / "config.json", kwargs)
    assert from_pytorch_main(["--weights", str(weights), "--config", str(config), "--out", str(tmp_path / "c")]) == 0
    codes = ref.random_codes(kwargs, batch=2, frames=11, seed=2)
    np.save(tmp_path / "codes.npy", codes)
    args = ["--checkpoint_dir", str(tmp_path / "c"), "--codes", str(tmp_path / "codes.npy")]
    assert forward_main(args + ["--out", str(tmp_path / "out.npz")]) == 0
    got = dict(np.load(tmp_path / "out.npz"))
    assert_parity(got, ref.torch_forward(lm, codes))
    np.save(tmp_path / "bad.npy", codes[:, :5])
    assert forward_main(["--checkpoint_dir", str(tmp_path / "c"), "--codes", str(tmp_path / "bad.npy"),
                         "--out", str(tmp_path / "x.npz")]) == 1
    assert "expected [B, 17, T]" in capsys.readouterr().err
    assert forward_main(["--checkpoint_dir", str(tmp_path / "nope"), "--codes", str(tmp_path / "codes.npy"),
                         "--out", str(tmp_path / "x.npz")]) == 1
    assert "nope: no such checkpoint directory" in capsys.readouterr().err


def test_imported_bf16_checkpoint_stays_bf16(tmp_path):
    kwargs = CONFIGS["small"]
    weights = ref.save_safetensors(tmp_path / "w.safetensors", ref.state_dict_numpy(ref.build_lm(kwargs)),
                                   dtype=ref.torch.bfloat16)
    config = ref.save_config(tmp_path / "config.json", kwargs)
    assert from_pytorch_main(["--weights", str(weights), "--config", str(config), "--out", str(tmp_path / "c")]) == 0
    model = load_model(tmp_path / "c")
    assert model.cfg.param_dtype == "bfloat16" and model.text_emb[...].dtype == jnp.bfloat16
