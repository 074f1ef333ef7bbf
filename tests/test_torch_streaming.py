"""Streaming TTT in PyTorch: conversion/torch_ttt.py under moshi's StreamingModule state and LMGen.

* Greedy `LMGen` over a loaded tttjax export equals `tttjax.model.streaming.generate` (what
  `python -m tttjax.generate --greedy` runs) token for token: random TTT models with base_lr 10 and
  gate 1 so that TTT visibly moves the outputs, TTT at one layer with mini-batch 4 and at two
  layers with mini-batch 16, two seeds each, 36 frames (several commits and a partial mini-batch).
  Negative control: the same PyTorch model with base_lr 0 generates other tokens.
* LMGen's per-frame logits (text through `on_text_logits_hook`, audio at the depformer heads) equal
  `LMModel.forward` on the generated codes: fp32, max |diff| < 1e-4 (the same maths; only the order
  of fp32 sums differs, a frame at a time against whole mini-batches and full attention; observed
  ~1e-6, while base_lr 0 moves the logits by > 1e-2).
* The TTT layer fed in chunks (sizes 3, 1, 6, 2) equals its one-chunk forward (fp32, 1e-5 on outputs
  of order 1, again summation order; observed ~2e-6); the state commits at mini-batch ends, reset()
  returns to the parameters, a batch element masked out by LMGen's exec_mask keeps its state (and
  its position) while the other one moves on, and both still match their own sequences.
* ttt.causal=false is refused for streaming with one line.
"""

import numpy as np
import pytest
import torch
import torch_reference as ref
from test_streaming import codes_from_generation, lmgen_reference

from conversion.to_pytorch import main as to_pytorch_main
from conversion.torch_ttt import TTTMLP, attach_ttt, load_ttt_moshi

KWARGS = ref.lm_kwargs(card=2048, depformer_num_layers=1)  # Mimi's card; one depformer layer keeps the programs small
FRAMES = 36
CASES = {  # name: (TTT layers, mini-batch size, seed)
    "one_layer_K4_seed0": ((1,), 4, 0),
    "one_layer_K4_seed1": ((1,), 4, 1),
    "two_layers_K16_seed2": ((0, 1), 16, 2),
    "two_layers_K16_seed3": ((0, 1), 16, 3),
}


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Eager torch steps are tiny: on a shared 2-core machine a second OpenMP thread makes them 5x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """case name -> (tttjax model, the PyTorch model loaded from its float32 export); built once."""
    from tttjax.checkpoint.model_dir import save_model
    from tttjax.model.config import from_lm_kwargs
    from tttjax.model.moshi import create_model

    built = {}

    def get(name):
        if name not in built:
            layers, K, seed = CASES[name]
            cfg = from_lm_kwargs(KWARGS, ttt_layers=layers, ttt_mini_batch_size=K, ttt_base_lr=10.0,
                                 ttt_initial_gating_alpha=1.0)
            model = create_model(cfg, seed=seed)
            root = tmp_path_factory.mktemp(name)
            save_model(root / "ckpt", model)
            assert to_pytorch_main(["--checkpoint_dir", str(root / "ckpt"), "--out", str(root / "export"),
                                    "--dtype", "float32"]) == 0
            lm = load_ttt_moshi(root / "export" / "consolidated.safetensors", root / "export" / "config.json")
            built[name] = model, lm
        return built[name]

    return get


def ttt_modules(lm):
    return [m for m in lm.modules() if isinstance(m, TTTMLP)]


def user_codes(seed, batch=2, frames=FRAMES):
    return np.random.default_rng(seed).integers(0, KWARGS["card"], (batch, KWARGS["n_q"] - KWARGS["dep_q"], frames))


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_lmgen_equals_tttjax_generate(exported, name):
    from tttjax.model import streaming

    model, lm = exported(name)
    layers, K, seed = CASES[name]
    assert [m.mini_batch_size for m in ttt_modules(lm)] == [K] * len(layers)
    user = user_codes(seed)
    want = streaming.generate(model, user, sampling=streaming.GREEDY)
    got = lmgen_reference(lm, user)
    assert got.shape == want.shape == (2, 1 + KWARGS["dep_q"], FRAMES)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got[:, 1, 1:])) > 5  # not a constant stream
    # Negative control: without the inner loop the same weights answer differently.
    for m in ttt_modules(lm):
        m.base_lr = 0.0
    try:
        assert (lmgen_reference(lm, user) != want).mean() > 0.1
    finally:
        for m in ttt_modules(lm):
            m.base_lr = 10.0


def lmgen_logits(lm, user):
    """Greedy LMGen over user [B, n_user, T]: (tokens as lmgen_reference, text logits [B, T, text_card],
    audio logits [B, dep_q, T, card]) with step s's logits at index s."""
    from moshi.models.lm import LMGen

    text, audio = [], [[] for _ in range(lm.dep_q)]
    hooks = [head.register_forward_hook(lambda _m, _i, out, k=k: audio[k].append(out[:, 0].clone()))
             for k, head in enumerate(lm.linears)]
    gen = LMGen(lm, use_sampling=False, on_text_logits_hook=lambda logits: text.append(logits[:, 0, 0].clone()))
    B, _, T = user.shape
    frames = []
    try:
        with gen.streaming(B):
            for t in range(T):
                out = gen.step(torch.from_numpy(user[:, :, t:t + 1]).long())
                frames.append(np.full((B, lm.dep_q + 1), -2) if out is None else out[:, :, 0].numpy())
    finally:
        for h in hooks:
            h.remove()
    return (np.stack(frames, axis=2), torch.stack(text, 1).numpy(),
            torch.stack([torch.stack(a, 1) for a in audio], 1).numpy())


def test_lmgen_logits_equal_teacher_forced_forward(exported):
    _, lm = exported("two_layers_K16_seed2")
    user = user_codes(5)
    tokens, text, audio = lmgen_logits(lm, user)
    max_delay = max(lm.delays)
    codes = codes_from_generation(tokens, user, max_delay)  # the generated stream as teacher-forcing codes
    F = codes.shape[2]
    want = ref.torch_forward(lm, codes)
    # Step s predicted frame s of the text and frame s - delay of audio codebook k.
    diff_text = np.abs(text[:, :F] - want["text_logits"][:, 0]).max()
    assert diff_text < 1e-4, diff_text
    diffs = []
    for k in range(lm.dep_q):
        delay = lm.delays[1 + k]
        diffs.append(np.abs(audio[:, k, delay:delay + F] - want["logits"][:, k, :F])[want["mask"][:, k]].max())
    assert max(diffs) < 1e-4, diffs
    assert want["mask"].sum() > 0.8 * want["mask"].size
    # The teacher-forced argmax is the generated stream; base_lr 0 moves the logits far beyond the tolerance.
    np.testing.assert_array_equal(want["text_logits"][:, 0].argmax(-1), codes[:, 0])
    for m in ttt_modules(lm):
        m.base_lr = 0.0
    try:
        plain = ref.torch_forward(lm, codes)
    finally:
        for m in ttt_modules(lm):
            m.base_lr = 10.0
    assert np.abs(plain["logits"] - want["logits"])[want["mask"]].max() > 1e-2


def random_ttt(K=4, seed=0, dim=32, heads=2):
    torch.manual_seed(seed)
    m = TTTMLP(dim, heads, mini_batch_size=K, base_lr=10.0, causal=True)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m.eval()


def test_chunks_commits_reset_and_exec_mask():
    m = random_ttt()
    h = torch.randn(2, 12, 32)
    with torch.no_grad():
        want = m(h)
        with m.streaming(2):
            state = m._streaming_state
            w1 = state.inner.w1.clone()
            got, start = [], 0
            for size in (3, 1, 6, 2):
                got.append(m(h[:, start:start + size]))
                start += size
                if start == 3:  # inside the first mini-batch: nothing committed, gradients absorbed
                    assert torch.equal(state.inner.w1, w1) and (state.inner.pos == 3).all()
                    assert state.inner.gw1.abs().max() > 0
                if start == 10:
                    assert (state.inner.pos == 2).all() and (state.inner.w1 - w1).abs().max() > 1e-3
            np.testing.assert_allclose(torch.cat(got, 1).numpy(), want.numpy(), atol=1e-5)
            m.reset_streaming()
            assert torch.equal(state.inner.w1, w1) and (state.inner.pos == 0).all()
            np.testing.assert_allclose(m(h[:, :5]).numpy(), want[:, :5].numpy(), atol=1e-5)
            # Element 1 skips a frame (exec_mask False): it keeps its state, then continues out of step.
            m.reset_streaming()
            outs = [m(h[:, t:t + 1]) for t in range(2)]
            m.set_exec_mask(torch.tensor([True, False]))
            skipped = m(h[:, 2:3])
            assert state.inner.pos.tolist() == [3, 2]
            m.set_exec_mask(torch.tensor([True, True]))
            rest = [m(torch.stack([h[0, t], h[1, t - 1]])[:, None]) for t in range(3, 12)]
        np.testing.assert_allclose(torch.cat(outs + [skipped] + rest, 1)[0].numpy(), want[0].numpy(), atol=1e-5)
        element1 = torch.cat(outs + rest, 1)[1]  # it saw frames 0..10, the masked step not counted
        np.testing.assert_allclose(element1.numpy(), m(h[1:, :11])[0].numpy(), atol=1e-5)


def test_non_causal_ttt_is_refused_for_streaming():
    from moshi.models.lm import LMGen

    lm = ref.build_lm(KWARGS)
    attach_ttt(lm, dict(enable=True, layers="1", mini_batch_size=4, causal=False))
    lm(torch.from_numpy(ref.random_codes(KWARGS, batch=1, frames=6)))  # teacher-forced: fine
    with pytest.raises(ValueError, match=r"^ttt.causal=false .* 3 future frames .* cannot run frame by frame"):
        with LMGen(lm).streaming(1):
            pass
