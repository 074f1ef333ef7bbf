"""Paper metrics: manifests from the official layouts, scoring with known answers, aggregation, the CLI."""

import csv
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_reference as ref
from flax import nnx

from tttjax.data import offline
from tttjax.eval import paper
from tttjax.eval.manifest import (
    ManifestError,
    Pair,
    read_manifest,
    slm21_pairs,
    story_pairs,
    write_manifest,
)
from tttjax.model.config import from_lm_kwargs
from tttjax.model.moshi import create_model


# -- manifests -----------------------------------------------------------------------------------
def write_gold(directory: Path, columns: list[str], rows: list[dict], *, wav_bytes=b"RIFF") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "gold.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    for row in rows:
        if not (directory / f"{row['filename']}.wav").exists():
            (directory / f"{row['filename']}.wav").write_bytes(wav_bytes)
    return directory / "gold.csv"


LEX_COLUMNS = ["filename", "voice", "frequency", "word", "phones", "length", "correct", "id"]
SYN_COLUMNS = ["filename", "type", "subtype", "transcription", "correct", "voice", "id"]


def test_manifests_from_official_layouts(tmp_path):
    lex = tmp_path / "sLM21" / "lexical" / "dev"
    rows = []
    for pid, freq in (("1", 0), ("2", 7), ("3", 250)):
        for voice in ("Alex", "Bruce"):
            rows.append(dict(filename=f"w{pid}{voice}", voice=voice, frequency=freq, word=f"word{pid}",
                             phones="w", length=3, correct=1, id=pid))
            rows.append(dict(filename=f"n{pid}{voice}", voice=voice, frequency=freq, word=f"nonw{pid}",
                             phones="n", length=3, correct=0, id=pid))
    write_gold(lex, LEX_COLUMNS, rows[::-1])  # file order must not matter
    pairs = slm21_pairs(tmp_path / "sLM21", "lexical", "dev")
    assert len(pairs) == 6 and {p.voice for p in pairs} == {"Alex", "Bruce"}
    p = pairs[0]
    assert (p.task, p.split, p.pair_id, p.voice) == ("swuggy", "dev", "1", "Alex")
    assert Path(p.pos).name == "w1Alex.wav" and Path(p.neg).name == "n1Alex.wav" and p.group == "oov"
    assert [q.group for q in pairs[::2]] == ["oov", "6-20", ">100"]

    syn = tmp_path / "syn"
    write_gold(syn, SYN_COLUMNS, [
        dict(filename="a1", type="morphology", subtype="plural", transcription="dogs run", correct=1, voice="V", id=0),
        dict(filename="a0", type="morphology", subtype="plural", transcription="dogs runs", correct=0, voice="V", id=0),
        dict(filename="b1", type="syntax", subtype="island", transcription="x", correct=1, voice="V", id=0),
        dict(filename="b0", type="syntax", subtype="island", transcription="y", correct=0, voice="V", id=0)])
    pairs = slm21_pairs(syn, "sblimp")
    assert [(p.pair_id, p.group, p.pos_text) for p in pairs] == [("morphology/plural/0", "morphology", "dogs run"),
                                                                 ("syntax/island/0", "syntax", "x")]
    # written and read back: the same explicit pairs
    back = read_manifest(write_manifest(tmp_path / "m.jsonl", pairs))
    assert back == pairs

    story = tmp_path / "story"
    for voice in ("", "v2"):
        for key in ("0_ab12", "1_cd34"):
            for label in ("correct", "incorrect"):
                (story / voice).mkdir(parents=True, exist_ok=True)
                (story / voice / f"{key}_{label}.wav").write_bytes(b"RIFF")
    (story / "0_ab12_correct.txt").write_text("and they lived happily")
    pairs = story_pairs(story, "ssc")
    assert [(p.pair_id, p.voice) for p in pairs] == [("0_ab12", ""), ("0_ab12", "v2"), ("1_cd34", ""),
                                                     ("1_cd34", "v2")]
    assert pairs[0].pos.endswith("0_ab12_correct.wav") and pairs[0].neg.endswith("0_ab12_incorrect.wav")
    assert pairs[0].pos_text == "and they lived happily"

    (story / "2_ef_correct.wav").write_bytes(b"RIFF")
    with pytest.raises(ManifestError, match="without both endings"):
        story_pairs(story, "tsc")
    write_gold(tmp_path / "bad", SYN_COLUMNS, [
        dict(filename="c1", type="t", subtype="s", transcription="x", correct=1, voice="V", id=0)])
    with pytest.raises(ManifestError, match="unpaired"):
        slm21_pairs(tmp_path / "bad", "sblimp")
    with pytest.raises(ManifestError, match="no gold.csv"):
        slm21_pairs(tmp_path / "story", "swuggy")


# -- aggregation ---------------------------------------------------------------------------------
def test_aggregation_ties_voices_bands_and_types():
    def pair(task, pid, voice, group, pos_score, neg_score, scores):
        pos, neg = f"{task}/{pid}/{voice}/pos", f"{task}/{pid}/{voice}/neg"
        scores[pos], scores[neg] = pos_score, neg_score
        return Pair(task, "dev", pid, voice, pos, neg, group=group)

    scores = {}
    pairs = [
        pair("swuggy", "1", "a", "oov", -1.0, -2.0, scores),  # win
        pair("swuggy", "1", "b", "oov", -3.0, -2.0, scores),  # loss -> pair 1 = 0.5 (voices averaged)
        pair("swuggy", "2", "a", "1-5", -1.0, -1.0, scores),  # tie = 0.5
        pair("swuggy", "3", "a", ">100", -0.5, -0.7, scores),  # win
        pair("swuggy", "4", "a", "", -0.5, -0.7, scores),  # no frequency: in no band
        pair("sblimp", "m/p/0", "a", "morph", -1.0, -1.5, scores),
        pair("sblimp", "m/p/1", "a", "morph", -2.0, -1.5, scores),
        pair("sblimp", "s/i/0", "a", "syntax", -1.0, -1.5, scores),
        pair("sstorycloze", "0_x", "", "", -5.0, -6.0, scores),
        pair("sstorycloze", "1_y", "", "", -7.0, -7.0, scores),
    ]
    res = paper.aggregate(pairs, scores)
    sw = res["swuggy"]
    assert sw["num_pairs"] == 4 and sw["num_trials"] == 5
    assert sw["accuracy"] == {"all": pytest.approx((0.5 + 0.5 + 1.0) / 3), "in_vocab": 0.75, "oov": 0.5}
    assert sw["by_group"] == {"oov": {"n": 1, "accuracy": 0.5}, "1-5": {"n": 1, "accuracy": 0.5},
                              ">100": {"n": 1, "accuracy": 1.0}}
    assert sw["pairs_without_frequency"] == 1
    sb = res["sblimp"]
    assert sb["accuracy"]["all"] == pytest.approx(2 / 3)
    assert sb["by_group"] == {"morph": {"n": 2, "accuracy": 0.5}, "syntax": {"n": 1, "accuracy": 1.0}}
    assert res["sstorycloze"]["accuracy"] == {"all": 0.75}
    table = paper.format_table(res, paper.Scoring())
    assert "mean log-likelihood per scored token; semantic codebook (q0) only" in table
    assert "in_vocab" in table and "75.00%" in table


# -- scoring with a model whose answer is known by construction ----------------------------------
def _set(model, updates):
    state = nnx.state(model, nnx.Param)
    flat = {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(state)}
    for path, fn in updates.items():
        value = np.array(flat[path].get_value(), np.float32)
        value = fn(value)
        flat[path].set_value(jnp.asarray(value, flat[path].get_value().dtype))
    nnx.update(model, state)


def counting_model():
    """Temporal and depformer layers are identities (zero output projections, TTT gate 0); the only paths:
    q0 at frame t-1 -> logit 10 on q0 = (that + 1) mod card at frame t ("counting"), and
    q0 at frame t+1 -> logit 20 on q1 = q0 at frame t+1 for frame t (the depformer's q0 -> q1 slot)."""
    kwargs = ref.lm_kwargs()
    cfg = from_lm_kwargs(kwargs, ttt_layers=(1,), ttt_mini_batch_size=4)
    model = create_model(cfg, seed=0)
    C, D = cfg.card, cfg.dim
    eye = np.eye(C, dtype=np.float32)

    def emb(v):
        v[:] = 0
        v[0, :C, :C] = eye  # Moshi q0 embedding = one-hot
        return v

    def dep_in(v):
        v[:] = 0
        v[0, :C, :C] = eye / np.sqrt(D)  # undo the out_norm's sqrt(D)
        return v

    def dep_emb(v):
        v[:] = 0
        v[0, :C, :C] = eye
        return v

    def linears(v):
        v[:] = 0
        v[0] = 10 * np.roll(eye, 1, axis=1)  # code c -> c + 1
        v[1] = 20 * eye
        return v

    zero = lambda v: v * 0  # noqa: E731
    _set(model, {
        ("transformer", "self_attn", "out_proj", "kernel"): zero,
        ("transformer", "gating", "linear_out", "kernel"): zero,
        ("depformer", "self_attn", "out_proj", "kernel"): zero,
        ("depformer", "gating", "linear_out", "kernel"): zero,
        ("ttt", "gating_alpha"): zero,
        ("text_emb",): zero, ("depformer_text_emb",): zero,
        ("out_norm", "alpha"): lambda v: v * 0 + 1,
        ("emb",): emb, ("depformer_in", "kernel"): dep_in, ("depformer_emb",): dep_emb, ("linears", "kernel"): linears,
    })
    return model


def runner(model):
    token_ce = paper.make_token_ce_fn(model.cfg)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, c, n: token_ce(nnx.merge(graphdef, s), c, n))
    return lambda codes, lengths: jax.device_get(fn(state, jnp.asarray(codes), jnp.asarray(lengths)))


def test_known_answers_by_codebook_choice_and_padding():
    model = counting_model()
    cfg = model.cfg
    rng = np.random.default_rng(0)
    F_ = 11

    def sequence(q0, q1):
        codes = rng.integers(0, cfg.card, (8, F_))
        codes[0], codes[1] = q0, q1
        silence = np.full((8, F_), 5)
        return paper.build_sequence(codes, silence, paper.Scoring(), cfg.n_q)

    counting = (rng.integers(cfg.card) + np.arange(F_)) % cfg.card
    random_q0 = rng.integers(0, cfg.card, F_)
    while np.any((np.diff(random_q0) - 1) % cfg.card == 0):  # no accidental counting step
        random_q0 = rng.integers(0, cfg.card, F_)
    copy_q1 = np.append(random_q0[1:], 0)  # q1 at t = q0 at t + 1 (moshi's acoustic delay)
    pos = sequence(counting, rng.integers(0, cfg.card, F_))  # the semantic stream the model predicts
    neg = sequence(random_q0, copy_q1)  # the acoustic stream the model predicts
    same = [pos, neg, pos.copy()]
    run = runner(model)

    def scores(codebooks, norm, seqs=same, batch_size=3, bucket=4):
        s = paper.Scoring(codebooks=codebooks, norm=norm)
        return paper.score_sequences(run, seqs, s.codebook_weights(cfg.dep_q), norm=norm, batch_size=batch_size,
                                     bucket=bucket, num_codebooks=cfg.num_codebooks)

    sem = scores("semantic", "mean")
    # counted on: ~0 per frame after the first (uniform: -log 32); random: ~-10 per frame
    assert sem[0] == pytest.approx((-np.log(32) + 10 * -np.log1p(31 * np.exp(-10))) / 11, rel=1e-5)
    assert sem[1] == pytest.approx((-np.log(32) + 10 * -np.log(np.exp(10) + 31)) / 11, rel=1e-5)
    assert sem[0] == sem[2]  # identical sequences tie exactly
    assert paper.trial_outcome(sem[0], sem[2]) == 0.5
    assert scores("semantic", "sum")[0] > scores("semantic", "sum")[1]
    every = scores("all", "mean")
    assert every[1] > every[0]  # q1's bigger margin wins when all codebooks count equally
    weighted = scores("weighted", "sum")
    assert weighted[0] > weighted[1]  # q0 x 100 dominates again
    # The scored tokens: q0 on every frame, q1..q7 on all but the delayed last frame.
    n = paper.score_sequences(lambda c, l: (np.ones_like(run(c, l)[0]), run(c, l)[1]), [pos],
                              np.ones(cfg.dep_q), norm="sum", batch_size=1, bucket=1,
                              num_codebooks=cfg.num_codebooks)
    assert n[0] == -(F_ + 7 * (F_ - 1))

    # Padding to a bucket (and sharing a batch) leaves every score unchanged (causal model).
    random_model = create_model(from_lm_kwargs(ref.lm_kwargs(), ttt_layers=(1,), ttt_mini_batch_size=4), seed=3)
    run = runner(random_model)
    short = pos[:, :7]
    seqs = [pos, short, neg]
    for codebooks in ("semantic", "all"):
        alone = [scores(codebooks, "sum", [s], batch_size=1, bucket=1)[0] for s in seqs]
        together = scores(codebooks, "sum", seqs, batch_size=2, bucket=16)
        np.testing.assert_allclose(together, alone, rtol=1e-5)


# -- the CLI end to end: wavs -> Mimi -> scores -> accuracies ------------------------------------
@pytest.fixture(scope="module")
def uniform_checkpoint(tmp_path_factory):
    """An imported TTT checkpoint whose audio logits are all 0: every audio token has log-likelihood
    -log(card) exactly, so summed scores favour the shorter wav and mean scores always tie."""

    from tttjax.checkpoint.model_dir import save_model

    tmp = tmp_path_factory.mktemp("paper")
    cfg = from_lm_kwargs(ref.lm_kwargs(card=2048), ttt_layers=(1,), ttt_mini_batch_size=4)
    model = create_model(cfg, seed=1)
    _set(model, {("linears", "kernel"): lambda v: v * 0})
    save_model(tmp / "ckpt", model)
    mimi = offline.save_random_mimi(tmp / "mimi.safetensors")
    return tmp / "ckpt", mimi


def _wav(path: Path, seconds: float, seed: int):
    import toydata

    pcm = toydata.speech_like(np.random.default_rng(seed), seconds, sample_rate=16000, channels=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    toydata.write_wav(path, pcm, 16000)


def build_layouts(root: Path):
    """sWUGGY: pair 1 wins in voice a and loses in voice b (0.5), pair 2 wins (in-vocab); sBLIMP: one pair per
    type, both won; sStoryCloze: two stories won. 'Won' = the positive is the shorter wav."""
    short, long = 0.4, 0.72  # 5 and 9 frames
    lex = root / "lexical" / "dev"
    rows = []
    for i, (pid, freq, voice, pos_len, neg_len) in enumerate((("1", 0, "a", short, long), ("1", 0, "b", long, short),
                                                              ("2", 30, "a", short, long))):
        for correct, seconds in ((1, pos_len), (0, neg_len)):
            name = f"{'w' if correct else 'n'}{pid}{voice}"
            _wav(lex / f"{name}.wav", seconds, seed=2 * i + correct)
            rows.append(dict(filename=name, voice=voice, frequency=freq, word=name, phones="x", length=3,
                             correct=correct, id=pid))
    write_gold(lex, LEX_COLUMNS, rows)
    syn = root / "syntactic" / "dev"
    rows = []
    for i, typ in enumerate(("morphology", "syntax")):
        for correct, seconds in ((1, short), (0, long)):
            name = f"{typ}{correct}"
            _wav(syn / f"{name}.wav", seconds, seed=100 + 2 * i + correct)
            rows.append(dict(filename=name, type=typ, subtype="s", transcription=name, correct=correct, voice="V",
                             id=0))
    write_gold(syn, SYN_COLUMNS, rows)
    story = root / "story"
    for i in range(2):
        _wav(story / f"{i}_abc_correct.wav", short, seed=10 + i)
        _wav(story / f"{i}_abc_incorrect.wav", long, seed=20 + i)


def test_cli_paper_metrics_end_to_end(uniform_checkpoint, tmp_path, capsys):
    from tttjax.eval.__main__ import main as eval_main

    ckpt, mimi = uniform_checkpoint
    build_layouts(tmp_path / "data")
    out = tmp_path / "res.json"
    common = ["--checkpoint_dir", str(ckpt), "--eval_type", "paper_metrics", "--mimi_weight", str(mimi),
              "--mimi_device", "cpu", "--codes_cache", str(tmp_path / "cache"), "--batch_size", "4",
              "--paper_data", f"swuggy={tmp_path / 'data'},sblimp={tmp_path / 'data'}",
              "--paper_data", f"sstorycloze={tmp_path / 'data' / 'story'}", "--output_json", str(out)]
    assert eval_main(common + ["--score_norm", "sum"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "TTT verification" in printed and "OK: every TTT tensor" in printed  # imported TTT dir: verified
    assert "paper metrics - scoring: summed log-likelihood; semantic codebook (q0) only" in printed
    assert "user stream = Mimi silence codes" in printed
    assert "Mimi codes of 14 wavs: 0 cached, 14 encoded" in printed
    res = json.loads(out.read_text())["paper_metrics"]
    assert res["scoring"]["norm"] == "sum" and res["scoring"]["codebooks"] == "semantic"
    tasks = res["tasks"]
    assert tasks["swuggy"]["accuracy"] == {"all": 0.75, "in_vocab": 1.0, "oov": 0.5}
    assert tasks["swuggy"]["num_pairs"] == 2 and tasks["swuggy"]["num_trials"] == 3
    assert tasks["sblimp"]["accuracy"] == {"all": 1.0}
    assert set(tasks["sblimp"]["by_group"]) == {"morphology", "syntax"}
    assert tasks["sstorycloze"]["accuracy"] == {"all": 1.0}
    # ZeroSpeech submission files: one `name score` line per wav; the positives (5 frames) score higher.
    scores_dir = tmp_path / "res_scores"
    lexical = dict(line.split() for line in (scores_dir / "lexical" / "dev.txt").read_text().splitlines())
    assert len(lexical) == 6 and float(lexical["w2a"]) > float(lexical["n2a"])
    assert float(lexical["w1b"]) < float(lexical["n1b"])
    assert (scores_dir / "syntactic" / "dev.txt").is_file() and (scores_dir / "sstorycloze" / "test.txt").is_file()
    manifest = read_manifest(scores_dir / "manifests" / "swuggy.jsonl")
    assert len(manifest) == 3

    # mean-normalised: every token has the same log-likelihood, every trial ties -> exactly 1/2.
    # The manifest written above is accepted as input, and every wav now comes from the cache.
    again = ["--checkpoint_dir", str(ckpt), "--eval_type", "paper_metrics", "--mimi_weight", str(mimi),
             "--codes_cache", str(tmp_path / "cache"), "--batch_size", "4", "--no_ttt_verify",
             "--paper_data", str(scores_dir / "manifests" / "swuggy.jsonl"), "--paper_data",
             f"sblimp={tmp_path / 'data'}", "--score_codebooks", "all", "--scores_dir", str(tmp_path / "s2"),
             "--output_json", str(tmp_path / "r2.json")]
    assert eval_main(again) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "Mimi codes of 10 wavs: 10 cached, 0 encoded" in printed and "TTT verification" not in printed
    res = json.loads((tmp_path / "r2.json").read_text())["paper_metrics"]
    assert res["scoring"]["norm"] == "mean" and res["scoring"]["codebooks"] == "all"
    assert res["tasks"]["swuggy"]["accuracy"] == {"all": 0.5, "in_vocab": 0.5, "oov": 0.5}
    assert res["tasks"]["sblimp"]["accuracy"] == {"all": 0.5}


def test_mimi_codes_and_cache(uniform_checkpoint, tmp_path):
    """The cached codes are MimiEncoder's codes of the 24 kHz mono wav; silence rides along."""
    from tttjax.data.codec import MimiEncoder
    from tttjax.eval.audio import CodeCache, read_mono

    _, mimi = uniform_checkpoint
    _wav(tmp_path / "a.wav", 0.4, seed=1)
    _wav(tmp_path / "b.wav", 0.4, seed=2)
    _wav(tmp_path / "c.wav", 0.48, seed=3)
    cache = CodeCache(str(mimi), tmp_path / "cache", device="cpu")
    got = cache.codes([str(tmp_path / n) for n in ("a.wav", "b.wav", "c.wav")], with_silence=True)
    assert cache.encoded == 3
    pcm = read_mono(tmp_path / "c.wav")
    assert pcm.shape == (round(0.48 * 24000),)
    want = MimiEncoder(Path(mimi), "cpu").encode([np.stack([pcm, np.zeros_like(pcm)])])[0]
    codes, samples = got[str(tmp_path / "c.wav")]
    np.testing.assert_array_equal(codes, want[:8])
    np.testing.assert_array_equal(cache.silence(samples), want[8:])
    assert codes.shape == (8, 6) and len(np.unique(codes[0])) > 1
    again = CodeCache(str(mimi), tmp_path / "cache", device="cpu")
    got2 = again.codes([str(tmp_path / "c.wav"), str(tmp_path / "a.wav")])
    assert again.encoded == 0 and again.hits == 2 and again._encoder is None
    np.testing.assert_array_equal(got2[str(tmp_path / "c.wav")][0], codes)
