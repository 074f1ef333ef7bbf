"""Sequences longer than the attention window: every implementation against the real `moshi` package.

moshi's `LMModel.forward` applies the `context` window in teacher-forced mode (docs/contract.md §9);
xla, blockwise and splash (Pallas interpret mode on CPU) must give its logits for T > context,
with and without TTT layers. Tolerances: fp32 logits within 1e-4 as in test_moshi_parity.py (the
implementations differ in summation order; observed ~3e-6); bf16 compute against moshi's fp32
within 0.25 (test_moshi_parity.test_bf16_params: 8 bits of mantissa on O(1)-O(10) logits).
Parameter gradients against xla's: within 1e-4 of each tensor's largest entry (or absolute where that
is below 1), fp32 sums over 2 x 150 frames in a different order.

The acceptance run: configs/tiny.py with context 16 and 400-frame sequences trains with blockwise
attention, resumes bitwise after SIGKILL, and its exported checkpoint gives moshi's logits.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_reference as ref
from flax import nnx
from test_faults import assert_same_state, steps_of
from test_moshi_parity import assert_parity, flax_forward
from test_ttt_model import randomize_ttt, ttt_model, with_fresh_ttt

from conversion.to_pytorch import main as to_pytorch_main
from conversion.torch_ttt import load_ttt_moshi
from tttjax import rundir
from tttjax.checkpoint.model_dir import save_model
from tttjax.weights.loader import load_model
from tttjax.weights.pytorch import load_pytorch

REPO = Path(__file__).resolve().parents[1]
IMPLS = ["xla", "blockwise", "splash"]  # the ones that run on CPU
FRAMES = 240


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A moshi LM with context 5 (48x shorter than the sequence): its files and logits."""
    tmp = tmp_path_factory.mktemp("plain")
    kwargs = ref.lm_kwargs(context=5, num_layers=2)
    lm = ref.build_lm(kwargs, seed=11)
    files = (ref.save_safetensors(tmp / "w.safetensors", ref.state_dict_numpy(lm)),
             ref.save_config(tmp / "config.json", kwargs))
    codes = ref.random_codes(kwargs, batch=2, frames=FRAMES, seed=1)
    return files, codes, ref.torch_forward(lm, codes)


@pytest.fixture(scope="module")
def with_ttt(tmp_path_factory):
    """moshi with TTT layers at 0 and 2 (conversion/torch_ttt.py), context 64, T = 240 (not a
    multiple of the TTT mini-batch or of any attention block): its export dir and logits."""
    tmp = tmp_path_factory.mktemp("ttt")
    kwargs = ref.lm_kwargs(num_layers=3, context=64)
    ttt = {"enable": True, "layers": "0,2", "base_lr": 1.0, "mini_batch_size": 7, "causal": True,
           "initial_gating_alpha": 0.1}
    _, weights, config, _ = ttt_model(tmp, kwargs, ttt)
    model = with_fresh_ttt(weights, config)
    randomize_ttt(model, seed=3)
    save_model(tmp / "ckpt", model)
    assert to_pytorch_main(["--checkpoint_dir", str(tmp / "ckpt"), "--out", str(tmp / "e"), "--dtype", "float32"]) == 0
    torch_lm = load_ttt_moshi(tmp / "e" / "consolidated.safetensors", tmp / "e" / "config.json")
    codes = ref.random_codes(kwargs, batch=2, frames=FRAMES, seed=2)
    return tmp / "ckpt", codes, ref.torch_forward(torch_lm, codes)


@pytest.mark.parametrize("impl", IMPLS)
def test_plain_moshi_beyond_the_window(plain, impl):
    (weights, config), codes, want = plain
    model = load_pytorch(weights, config, attention_impl=impl)
    assert model.cfg.context == 5 and model.transformer.self_attn.attention_impl == impl
    assert_parity(flax_forward(model, codes), want)


@pytest.mark.parametrize("impl", IMPLS)
def test_ttt_moshi_beyond_the_window(with_ttt, impl):
    ckpt, codes, want = with_ttt
    assert_parity(flax_forward(load_model(ckpt, attention_impl=impl), codes), want)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_compute_beyond_the_window(plain, impl):
    (weights, config), codes, want = plain
    got = flax_forward(load_pytorch(weights, config, attention_impl=impl, dtype="bfloat16"), codes)
    assert np.abs(got["logits"] - want["logits"])[want["mask"]].max() < 0.25
    assert np.abs(got["text_logits"] - want["text_logits"])[want["text_mask"]].max() < 0.25


def test_chunked_eval_carries_the_state_as_training(with_ttt):
    """The chunked forward of eval/decode (ring KV cache, carried TTT state, 56-frame chunks: not a
    multiple of the TTT mini-batch of 7 nor of the window) gives moshi's logits too, so training's
    one pass over the sequence and the chunked evaluation see the same TTT memory."""
    from tttjax.model.streaming import chunked_forward

    ckpt, codes, want = with_ttt
    got = chunked_forward(load_model(ckpt), codes, chunk_size=56)
    assert_parity({k: np.asarray(v) for k, v in got._asdict().items()}, want)


def test_model_gradients_equal_xla(with_ttt):
    """d(logits . w)/d(params) of the TTT model: blockwise and splash against xla, every parameter."""
    ckpt, codes, _ = with_ttt
    codes = jnp.asarray(codes[:, :, :150])

    def grads(impl):
        model = load_model(ckpt, attention_impl=impl)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def objective(params):
            out = nnx.merge(graphdef, params, rest)(codes)
            w = jnp.cos(jnp.arange(out.logits.size, dtype=jnp.float32).reshape(out.logits.shape) * 0.37)
            return jnp.sum(jnp.where(out.mask[..., None], out.logits, 0.0) * w)

        return jax.jit(jax.grad(objective))(params)

    want = grads("xla")
    for impl in ("blockwise", "splash"):
        got = grads(impl)
        for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
            scale = float(jnp.abs(w).max())
            assert float(jnp.abs(g - w).max()) <= 1e-4 * max(scale, 1.0), (impl, jax.tree_util.keystr(path))
    attn = "['transformer']['self_attn']['in_proj']['kernel']"  # the temporal attention is in the check
    assert any(attn in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(want)[0])


def test_cli_attention_impl_overrides_the_checkpoint(with_ttt, tmp_path):
    """tttjax.forward --attention_impl: the logits checker compares implementations on one checkpoint."""
    from tttjax.forward import main as forward_main

    ckpt, codes, want = with_ttt
    np.save(tmp_path / "codes.npy", codes)
    for impl in ("xla", "blockwise"):
        out = tmp_path / f"{impl}.npz"
        assert forward_main(["--checkpoint_dir", str(ckpt), "--codes", str(tmp_path / "codes.npy"),
                             "--out", str(out), "--attention_impl", impl]) == 0
        assert_parity(dict(np.load(out)), want)
    with pytest.raises(SystemExit):
        forward_main(["--checkpoint_dir", str(ckpt), "--codes", str(tmp_path / "codes.npy"),
                      "--out", str(tmp_path / "x.npz"), "--attention_impl", "flash"])


# -- acceptance: a 400-frame training run with a 16-frame window ---------------------------------

LONG_RUN = ["--config=configs/tiny.py", "--config.model.context=16", "--config.duration_sec=32",  # 400 frames
            "--config.model.attention_impl=blockwise", "--config.batch_size=2", "--config.max_steps=4",
            "--config.ckpt_freq=1", "--config.num_ckpt_keep=10", "--config.eval_freq=0", "--config.log_freq=1", "--config.export_dtype=float32",
            "--config.data.train_data=synthetic:16", "--config.checkpoint.async_save=false"]


def test_long_sequence_training_resumes_bitwise_and_matches_moshi(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}

    def command(run_dir):
        return [sys.executable, "-m", "tttjax.main", *LONG_RUN, f"--config.run_dir={run_dir}"]

    straight = tmp_path / "straight"
    done = subprocess.run(command(straight), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert steps_of(straight) == [1, 2, 3, 4]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not rundir.step_dir(killed, 2).is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert max(steps_of(killed)) < 4
    done = subprocess.run(command(killed), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "start at step" in (killed / "logs" / "train.log").read_text()
    assert_same_state(rundir.step_dir(killed, 4), rundir.step_dir(straight, 4))

    # The trained model (TTT at layers 1 and 3) exported to PyTorch: moshi's LMModel with the
    # TTT blocks gives the blockwise logits on 400 frames, 25x the window.
    step = rundir.step_dir(straight, 4)
    assert to_pytorch_main(["--checkpoint_dir", str(step), "--out", str(tmp_path / "e"), "--dtype", "float32"]) == 0
    torch_lm = load_ttt_moshi(tmp_path / "e" / "consolidated.safetensors", tmp_path / "e" / "config.json")
    model = load_model(step)
    assert model.cfg.attention_impl == "blockwise" and model.cfg.context == 16 and model.cfg.ttt_layers == (1, 3)
    kwargs = model.cfg.raw_lm_kwargs()
    codes = ref.random_codes(kwargs, batch=2, frames=400, seed=5)
    assert_parity(flax_forward(model, codes), ref.torch_forward(torch_lm, codes))
