"""PyTorch -> JAX -> PyTorch: bitwise in fp32, loads strictly into moshi, adapters + base == merged."""

import json

import numpy as np
import pytest
import torch
import torch_reference as ref
from safetensors.numpy import load_file

from conversion.from_pytorch import main as from_pytorch_main
from conversion.to_pytorch import main as to_pytorch_main


@pytest.mark.parametrize("layout", ["moshi", "release"])
def test_round_trip_is_bitwise_and_loads_strictly(tmp_path, layout):
    kwargs = ref.lm_kwargs()
    lm = ref.build_lm(kwargs, seed=11)
    sd = ref.state_dict_numpy(lm)
    if layout == "release":
        sd = ref.to_release_layout(sd)
    weights = ref.save_safetensors(tmp_path / "w.safetensors", sd)
    config = ref.save_config(tmp_path / "config.json", kwargs)
    assert from_pytorch_main(["--weights", str(weights), "--config", str(config), "--out", str(tmp_path / "c")]) == 0
    out = tmp_path / "export"
    assert to_pytorch_main(["--checkpoint_dir", str(tmp_path / "c"), "--out", str(out), "--dtype", "float32",
                            "--layout", layout]) == 0
    exported = load_file(str(out / "consolidated.safetensors"))
    assert list(exported) == sorted(exported) and exported.keys() == sd.keys()
    for k, v in sd.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    from safetensors import safe_open

    with safe_open(str(out / "consolidated.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lora"] is False and "ttt" not in cfg  # stock moshi rejects a "ttt" key
    # Strict load into moshi's LMModel, same logits as the original.
    from moshi.models import loaders

    lm2 = loaders.get_moshi_lm(None, lm_kwargs=kwargs, device="cpu", dtype=torch.float32)
    lm2.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    codes = ref.random_codes(kwargs, batch=1, frames=7)
    a, b = ref.torch_forward(lm.eval(), codes), ref.torch_forward(lm2.eval(), codes)
    np.testing.assert_array_equal(a["logits"][a["mask"]], b["logits"][b["mask"]])
    # Never overwrite an export.
    assert to_pytorch_main(["--checkpoint_dir", str(tmp_path / "c"), "--out", str(out)]) == 1


def test_bf16_round_trip_is_exact_to_rounding(tmp_path):
    kwargs = ref.lm_kwargs()
    sd = {k: v for k, v in ref.state_dict_numpy(ref.build_lm(kwargs)).items()}
    weights = ref.save_safetensors(tmp_path / "w.safetensors", sd, dtype=torch.bfloat16)
    config = ref.save_config(tmp_path / "config.json", kwargs)
    assert from_pytorch_main(["--weights", str(weights), "--config", str(config), "--out", str(tmp_path / "c")]) == 0
    assert to_pytorch_main(["--checkpoint_dir", str(tmp_path / "c"), "--out", str(tmp_path / "e")]) == 0
    from safetensors.torch import load_file as torch_load

    original, exported = torch_load(str(weights)), torch_load(str(tmp_path / "e" / "consolidated.safetensors"))
    assert all(exported[k].dtype == torch.bfloat16 for k in exported)
    for k in original:
        assert torch.equal(original[k], exported[k]), k


def served(weights, config, lora=None):
    """The LMModel `moshi.server` builds from these local files (its loader calls, fp32, LoRA fused)."""
    from moshi.models import loaders

    info = loaders.CheckpointInfo.from_hf_repo("unused/repo", str(weights), "unused-mimi", "unused-tokenizer",
                                               config_path=str(config), lora_weights=lora and str(lora))
    return info.get_moshi(device="cpu", dtype=torch.float32, fuse_lora=True)


def test_adapters_plus_base_equal_merged(tmp_path):
    """lora.safetensors on the base gives the merged export's logits within bf16 rounding."""
    kwargs = ref.lm_kwargs()
    lm = ref.build_lm(kwargs, lora_rank=4)
    sd = ref.state_dict_numpy(lm)
    base = {k.replace(".frozen_W", ""): v for k, v in sd.items() if ".lora_" not in k}
    weights = ref.save_safetensors(tmp_path / "w.safetensors", base)
    lora = ref.save_safetensors(tmp_path / "lora_in.safetensors", {k: v for k, v in sd.items() if ".lora_" in k})
    config = ref.save_config(tmp_path / "config.json", kwargs, lora=True, lora_rank=4, lora_scaling=2.0)
    assert from_pytorch_main(["--weights", str(weights), "--config", str(config), "--lora", str(lora),
                              "--out", str(tmp_path / "c")]) == 0
    assert to_pytorch_main(["--checkpoint_dir", str(tmp_path / "c"), "--out", str(tmp_path / "merged")]) == 0
    assert to_pytorch_main(["--checkpoint_dir", str(tmp_path / "c"), "--out", str(tmp_path / "adapters"),
                            "--adapters_only"]) == 0
    adapters = load_file(str(tmp_path / "adapters" / "lora.safetensors"))
    assert adapters and all(".lora_A." in k or ".lora_B." in k for k in adapters)
    acfg = json.loads((tmp_path / "adapters" / "config.json").read_text())
    assert (acfg["lora"], acfg["lora_rank"], acfg["lora_scaling"]) == (True, 4, 2.0)
    # Both load as stock `python -m moshi.server --moshi-weight W --config-path C [--lora-weight L]` loads.
    merged = served(tmp_path / "merged" / "consolidated.safetensors", tmp_path / "merged" / "config.json")
    with_lora = served(weights, tmp_path / "adapters" / "config.json", tmp_path / "adapters" / "lora.safetensors")
    codes = ref.random_codes(kwargs, batch=2, frames=9)
    a, b, want = ref.torch_forward(merged, codes), ref.torch_forward(with_lora, codes), ref.torch_forward(lm, codes)
    # bf16 storage: relative rounding 2^-8 of weights O(0.1-1); logits O(1-10) move by a few 1e-2.
    assert np.abs(a["logits"] - b["logits"])[a["mask"]].max() < 0.1
    assert np.abs(b["logits"] - want["logits"])[a["mask"]].max() < 0.1


def test_integer_tensors_are_refused_by_name(tmp_path, capsys):
    """An int32 (or bool) tensor where the model holds floats would be cast, its values truncated: refused."""
    from safetensors.numpy import save_file

    kwargs = ref.lm_kwargs()
    sd = ref.state_dict_numpy(ref.build_lm(kwargs))
    sd["emb.0.weight"] = sd["emb.0.weight"].astype(np.int32)
    sd["out_norm.alpha"] = sd["out_norm.alpha"] > 0
    save_file(sd, str(tmp_path / "w.safetensors"))
    config = ref.save_config(tmp_path / "config.json", kwargs)
    assert from_pytorch_main(["--weights", str(tmp_path / "w.safetensors"), "--config", str(config),
                              "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {tmp_path / 'w.safetensors'} does not match its config: non-floating dtypes where the "
                   "model holds floats ['emb.0.weight int32', 'out_norm.alpha bool']")
    assert not (tmp_path / "c").exists()
