"""Streaming inference (tttjax.model.streaming, tttjax.generate, forward --streaming).

* Greedy generation equals moshi's `LMGen(use_sampling=False)` token for token (random moshi models
  imported with conversion.from_pytorch; LoRA, context < T, dep_q = 4 with delay 2).
* Teacher-forced logits through the step-by-step / chunked path equal the full-sequence forward
  (fp32, max |diff| < 1e-4 on masked positions; observed ~5e-7) for a model with causal TTT layers,
  T = 11 not a multiple of the mini-batch (4), and context (6) < T.
* A model with ttt.causal = False is refused.
* Sampling: a fixed seed reproduces, top-k / temperature draw from moshi's distribution.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_reference as ref
from flax import nnx

from tttjax.model import streaming
from tttjax.model.config import from_lm_kwargs
from tttjax.model.moshi import create_model
from tttjax.weights.pytorch import load_pytorch

TTT_KWARGS = ref.lm_kwargs(context=6, num_layers=3)
TTT_FRAMES = 11


def make_ttt_model(**changes):
    # base_lr 10 and gate 1: the inner loop moves the logits by ~0.1, so a wrong carry shows.
    fields = dict(ttt_layers=(0, 2), ttt_mini_batch_size=4, ttt_base_lr=10.0, ttt_initial_gating_alpha=1.0)
    fields.update(changes)
    return create_model(from_lm_kwargs(TTT_KWARGS, **fields), seed=0)


@pytest.fixture(scope="module")
def ttt_checkpoint(tmp_path_factory):
    from tttjax.checkpoint.model_dir import save_model

    path = tmp_path_factory.mktemp("ttt") / "ckpt"
    save_model(path, make_ttt_model())
    return path


@pytest.fixture(scope="module")
def ttt_model(ttt_checkpoint):
    # Loaded as the CLIs load it, so their programs are the ones compiled (and cached) here.
    from tttjax.weights.loader import load_model

    return load_model(ttt_checkpoint)


def full_forward(model, codes):
    out = nnx.jit(lambda m, c: m(c))(model, jnp.asarray(codes))
    return {k: np.asarray(v) for k, v in out._asdict().items()}


def assert_same_logits(got, want, tol=1e-4):
    got = {k: np.asarray(v) for k, v in got.items()}
    for key, mask in (("logits", "mask"), ("text_logits", "text_mask")):
        np.testing.assert_array_equal(got[mask], want[mask])
        m = want[mask]
        assert m.sum() > 0
        diff = np.abs(got[key] - want[key])[m]
        assert diff.max() < tol, f"{key}: max abs diff {diff.max()}"
        np.testing.assert_array_equal(np.isnan(got[key]), np.isnan(want[key]))


def lmgen_reference(lm, user, sampling_kwargs=None):
    """moshi LMGen over user codes [B, n_user, T]; None steps as -2 (what generate() writes)."""
    from moshi.models.lm import LMGen

    gen = LMGen(lm, **(sampling_kwargs or dict(use_sampling=False)))
    B, _, T = user.shape
    frames = []
    with gen.streaming(B):
        for t in range(T):
            out = gen.step(torch.from_numpy(user[:, :, t:t + 1]).long())
            frames.append(np.full((B, lm.dep_q + 1), -2) if out is None else out[:, :, 0].numpy())
    return np.stack(frames, axis=2)


LMGEN_CONFIGS = {
    "lora": (ref.lm_kwargs(), 4),
    "context_lt_T": (ref.lm_kwargs(context=5, num_heads=8, num_layers=3), 0),
    "fewer_steps": (ref.lm_kwargs(n_q=8, dep_q=4, delays=[0, 0, 2, 2, 2, 0, 1, 1, 1]), 0),
}


@pytest.mark.parametrize("name", sorted(LMGEN_CONFIGS))
def test_greedy_generation_matches_lmgen(tmp_path, name):
    kwargs, lora_rank = LMGEN_CONFIGS[name]
    lm = ref.build_lm(kwargs, lora_rank=lora_rank, seed=len(name))
    sd = ref.state_dict_numpy(lm)
    base = ref.save_safetensors(tmp_path / "w.safetensors", {k: v for k, v in sd.items() if ".lora_" not in k})
    lora = None
    extra = {}
    if lora_rank:
        lora = ref.save_safetensors(tmp_path / "lora.safetensors", {k: v for k, v in sd.items() if ".lora_" in k})
        extra = dict(lora=True, lora_rank=lora_rank, lora_scaling=2.0)
    model = load_pytorch(base, ref.save_config(tmp_path / "config.json", kwargs, **extra), lora=lora)
    assert model.cfg.lora_rank == lora_rank
    B, T = 2, 14
    user = np.random.default_rng(len(name)).integers(0, kwargs["card"], (B, kwargs["n_q"] - kwargs["dep_q"], T))
    want = lmgen_reference(lm, user)
    got = streaming.generate(model, user)
    assert got.shape == (B, 1 + kwargs["dep_q"], T)
    max_delay = max(kwargs["delays"])
    assert (got[:, :, :max_delay] == -2).all() and (got[:, :, max_delay:] >= 0).all()
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got[:, 1, max_delay:])) > 1  # not a constant stream


@pytest.mark.parametrize("chunk_size", [1, 3, TTT_FRAMES])
def test_teacher_forced_chunks_match_full_forward(ttt_model, chunk_size):
    codes = ref.random_codes(TTT_KWARGS, batch=2, frames=TTT_FRAMES, seed=3)
    want = full_forward(ttt_model, codes)
    got = streaming.chunked_forward(ttt_model, codes, chunk_size)
    assert_same_logits(got._asdict(), want)


def test_state_is_carried_and_matters(ttt_model):
    """The inner state moves (and commits at mini-batch ends) and the TTT branch changes the logits."""
    streamer = streaming.StreamingLM(ttt_model)
    codes = ref.random_codes(TTT_KWARGS, batch=2, frames=TTT_FRAMES, seed=3)
    state = streamer.init_chunk_state(2, max_frames=12)
    w1 = np.asarray(state.stream.ttt[0].w1)
    state, _ = streamer.forward_chunk(state, codes[:, :, :3])  # inside the first mini-batch: no commit
    ttt = state.stream.ttt[0]
    np.testing.assert_array_equal(np.asarray(ttt.w1), w1)
    assert (np.asarray(ttt.pos) == 3).all() and np.abs(np.asarray(ttt.gw1)).max() > 0
    state, _ = streamer.forward_chunk(state, codes[:, :, 3:6])  # crosses the boundary after frame 3
    ttt = state.stream.ttt[0]
    assert (np.asarray(ttt.pos) == 2).all() and int(state.stream.offset) == 6
    assert np.abs(np.asarray(ttt.w1) - w1).max() > 1e-4
    # Without the inner loop (base_lr 0) the same weights give other logits: the tests above are sensitive.
    want = full_forward(ttt_model, codes)
    diff = np.abs(full_forward(make_ttt_model(ttt_base_lr=0.0), codes)["logits"] - want["logits"])[want["mask"]]
    assert diff.max() > 1e-2


def test_non_causal_ttt_is_refused():
    model = make_ttt_model(ttt_causal=False)
    with pytest.raises(ValueError, match=r"ttt.causal=False.*future frames.*cannot be computed frame by frame"):
        streaming.StreamingLM(model)
    with pytest.raises(ValueError, match="ttt.causal=False"):
        streaming.init_gen_state(model, 1)


def test_context_none_needs_max_frames():
    model = create_model(from_lm_kwargs(dict(ref.lm_kwargs(), context=None)), seed=0)
    with pytest.raises(ValueError, match="pass max_frames"):
        streaming.init_chunk_state(model, 1)
    streamer = streaming.StreamingLM(model)
    state = streamer.init_chunk_state(1, max_frames=2)
    codes = ref.random_codes(ref.lm_kwargs(), batch=1, frames=3, pad_tail=0)
    with pytest.raises(ValueError, match="sized for max_frames=2"):
        streamer.forward_chunk(state, codes)


def test_sampling_follows_moshi_definitions():
    from moshi.utils.sampling import sample_token as moshi_sample

    logits = jnp.asarray(np.random.default_rng(0).normal(0, 1.5, 12), jnp.float32)
    n = 40000
    for temp, top_k in ((0.7, 4), (1.3, 0)):
        probs = np.asarray(jax.nn.softmax(logits / temp))
        if top_k:
            probs = np.where(probs >= np.sort(probs)[-top_k], probs, 0.0)
            probs /= probs.sum()
        ours = jax.jit(lambda key: streaming.sample_token(jnp.broadcast_to(logits, (n, 12)), key, use_sampling=True,
                                                          temp=temp, top_k=top_k))(jax.random.key(1))
        torch.manual_seed(0)
        theirs = moshi_sample(torch.from_numpy(np.array(logits)).expand(n, 12), True, temp, top_k).numpy()
        f_ours, f_theirs = (np.bincount(np.asarray(x), minlength=12) / n for x in (ours, theirs))
        # 40000 draws: the standard error of a frequency is <= 0.0025.
        assert np.abs(f_ours - probs).max() < 0.012 and np.abs(f_theirs - probs).max() < 0.012
        assert (f_ours[probs == 0] == 0).all()
    greedy = streaming.sample_token(logits, jax.random.key(0), use_sampling=False, temp=0.7, top_k=4)
    assert int(greedy) == int(np.argmax(logits))
    zero_temp = streaming.sample_token(logits, jax.random.key(0), use_sampling=True, temp=0.0, top_k=4)
    assert int(zero_temp) == int(np.argmax(logits))


def test_sampled_generation_is_reproducible():
    sampling = streaming.Sampling(temp=1.0, temp_text=0.9, top_k=8, top_k_text=5)
    user = np.random.default_rng(0).integers(0, TTT_KWARGS["card"], (2, 8, 8))
    streamer = streaming.StreamingLM(create_model(from_lm_kwargs(ref.lm_kwargs()), seed=1))
    a = streaming.generate(streamer, user, sampling=sampling, seed=0)
    b = streaming.generate(streamer, user, sampling=sampling, seed=0)
    c = streaming.generate(streamer, user, sampling=sampling, seed=1)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert (a[:, 1:, 1:] < TTT_KWARGS["card"]).all() and (a[:, 0, 1:] < TTT_KWARGS["text_card"]).all()


def codes_from_generation(out, user, max_delay):
    """Teacher-forcing codes [B, K, F] equivalent to a generation: model frame f is out[..., f + max_delay],
    and LMGen feeds user input t where the training forward has codes frame t - 1."""
    frames = out.shape[2] - max_delay - 1
    return np.concatenate([out[:, :, max_delay:max_delay + frames], user[:, :, 1:1 + frames]], axis=1)


def test_ttt_generation_is_self_consistent(ttt_model):
    """Greedy tokens of a TTT model are the argmax of its own full-sequence logits on the generated codes
    (moshi has no TTT; this checks delays + carried TTT state in generation against the full forward)."""
    max_delay = max(TTT_KWARGS["delays"])
    user = np.random.default_rng(1).integers(0, TTT_KWARGS["card"], (2, 8, TTT_FRAMES + max_delay + 1))
    out = streaming.generate(ttt_model, user)
    codes = codes_from_generation(out, user, max_delay)
    assert codes.shape == (2, 17, TTT_FRAMES)
    full = full_forward(ttt_model, codes)
    text_ok = full["text_mask"][:, 0]
    np.testing.assert_array_equal(full["text_logits"][:, 0].argmax(-1)[text_ok], codes[:, 0][text_ok])
    mask = full["mask"]
    np.testing.assert_array_equal(full["logits"].argmax(-1)[mask], codes[:, 1:9][mask])


def test_cli_generate_and_forward_streaming(tmp_path, capsys, ttt_checkpoint, ttt_model):
    from tttjax.forward import main as forward_main
    from tttjax.generate import main as generate_main

    ckpt = ttt_checkpoint
    codes = ref.random_codes(TTT_KWARGS, batch=2, frames=TTT_FRAMES, seed=3)
    np.save(tmp_path / "codes.npy", codes)
    common = ["--checkpoint_dir", str(ckpt), "--codes", str(tmp_path / "codes.npy")]
    assert forward_main(common + ["--out", str(tmp_path / "full.npz")]) == 0
    assert forward_main(common + ["--out", str(tmp_path / "stream.npz"), "--streaming", "--chunk_size", "3"]) == 0
    assert_same_logits(dict(np.load(tmp_path / "stream.npz")), dict(np.load(tmp_path / "full.npz")))

    max_delay = max(TTT_KWARGS["delays"])
    user = np.random.default_rng(1).integers(0, TTT_KWARGS["card"], (2, 8, TTT_FRAMES + max_delay + 1))
    np.save(tmp_path / "user.npy", user)
    args = ["--checkpoint_dir", str(ckpt), "--user_codes", str(tmp_path / "user.npy")]
    assert generate_main(args + ["--out", str(tmp_path / "out.npy"), "--greedy"]) == 0
    assert "frames/s" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), streaming.generate(ttt_model, user))
    np.save(tmp_path / "bad.npy", user[:, :5])
    assert generate_main(["--checkpoint_dir", str(ckpt), "--user_codes", str(tmp_path / "bad.npy"),
                          "--out", str(tmp_path / "x.npy")]) == 1
    assert "expected [B, 8, T]" in capsys.readouterr().err
