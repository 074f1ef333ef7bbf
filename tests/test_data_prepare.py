"""prepare: real wavs, a tokenizer trained here and a random Mimi; codes, text, bad inputs, resume."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece
import sphn
import torch
import toydata
from moshi.models import loaders

from tttjax.data import codec, make_dataset, make_eval_iterator, offline, prepare, shards
from tttjax.data.sources import PreparedSource

MAIN = "SPEAKER_MAIN"
SEG = 1.2  # --duration_sec: 15 frames, 28800 samples
CORPUS = ["hi yes abcdef go no ok", "hello world again", "the quick brown fox jumps over the lazy dog"]
A_WORDS = [
    ("hi", 0.10, 0.30, MAIN),
    ("yes", 0.50, 0.90, MAIN),
    ("ok", 0.40, 0.45, "SPEAKER_OTHER"),
    ("abcdef", 0.97, 1.10, MAIN),
    ("go", 1.30, 1.50, MAIN),
    ("no", 1.37, 1.60, MAIN),
]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir()

    def wav(name, seconds, sample_rate=24000, channels=2, words=((("go", 0.2, 0.4, MAIN)),)):
        path = data / name
        toydata.write_wav(path, toydata.speech_like(rng, seconds, sample_rate, channels), sample_rate)
        if words is not None:
            toydata.write_alignments(path, list(words))
        return path

    wav("a.wav", 1.9, words=A_WORDS)
    wav("b.wav", 1.0, sample_rate=16000)  # resampled, with a note
    wav("c.wav", 1.0, channels=1)  # mono
    wav("e.wav", 1.0).with_suffix(".json").write_text("{not json")
    wav("f.wav", 1.0, words=None)  # no alignment file
    wav("g.wav", 1.0)  # the jsonl says 3 s
    wav("h.wav", 1.0)
    jsonl = data / "train.jsonl"
    entries = [("a.wav", 1.9)] + [(f"{c}.wav", 1.0) for c in "bcdef"] + [("g.wav", 3.0)]
    toydata.write_jsonl(jsonl, entries)
    with open(jsonl, "a") as f:  # a malformed line, then the last good file
        f.write('{"path": "x.wav"}\n' + json.dumps({"path": "h.wav", "duration": 1.0}) + "\n")
    return SimpleNamespace(
        root=root,
        data=data,
        jsonl=jsonl,
        tokenizer=offline.train_tokenizer(root / "tok", CORPUS),
        mimi=offline.save_random_mimi(root / "mimi.safetensors"),
    )


def prepare_argv(toy, out, *extra) -> list[str]:
    return ["--jsonl", str(toy.jsonl), "--out", str(out), "--mimi_weight", str(toy.mimi),
            "--tokenizer", str(toy.tokenizer), "--duration_sec", str(SEG), "--files_per_shard", "2", *extra]


def run_prepare(toy, out, *extra):
    assert prepare.main(prepare_argv(toy, out, *extra)) == 0
    return json.loads((out / "metadata.json").read_text())


def prepare_error(toy, out, capsys, *extra) -> str:
    """The one line a refused prepare prints (exit status 1)."""
    assert prepare.main(prepare_argv(toy, out, *extra)) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1].split("\r")[-1]  # after the progress bar's frames
    assert last.startswith("error: prepare: ") and "Traceback" not in err, err
    return last


@pytest.fixture(scope="module")
def prepared(toy):
    out = toy.root / "prepared"
    return out, run_prepare(toy, out)


def examples_of(out, meta, name):
    """The examples prepared from source `name`, in order."""
    src = PreparedSource(out)
    first = 0
    for s in meta["sources"]:
        if s["name"] == name:
            return [src[i] for i in range(first, first + s["num_examples"])]
        first += s.get("num_examples", 0)
    raise KeyError(name)


def direct_codes(mimi, pcm):
    with torch.no_grad():
        return mimi.encode(torch.from_numpy(np.ascontiguousarray(pcm))[:, None]).reshape(16, -1).numpy()


def test_codes_equal_a_direct_mimi_call(toy, prepared):
    out, meta = prepared
    mimi = loaders.get_mimi(toy.mimi)
    pcm, _ = sphn.read(str(toy.data / "a.wav"))
    a = examples_of(out, meta, "a.wav")
    assert [e.shape for e in a] == [(17, 15), (17, 9)]  # 1.2 s, then 0.7 s = 16800 samples -> ceil(8.75)
    for example, (s0, s1) in zip(a, [(0, 28800), (28800, 45600)]):
        assert example.dtype == np.int16
        np.testing.assert_array_equal(example[1:], direct_codes(mimi, pcm[:, s0:s1]))
    assert len(np.unique(a[0][1:])) > 16, "codes do not vary: Mimi codebooks empty?"

    pcm16, sr = sphn.read(str(toy.data / "b.wav"))
    resampled = sphn.resample(pcm16, src_sample_rate=sr, dst_sample_rate=24000)[:, :24000]
    (b,) = examples_of(out, meta, "b.wav")
    np.testing.assert_array_equal(b[1:], direct_codes(mimi, resampled))


def test_text_stream_hand_worked(toy, prepared):
    out, meta = prepared
    sp = sentencepiece.SentencePieceProcessor(str(toy.tokenizer))
    assert sp.encode("abcdef") == [sp.piece_to_id(c) for c in "abcdef"]  # the toy tokenizer is per char
    h, i, y, e, s, a, b, c, g, n, o = (sp.piece_to_id(ch) for ch in "hiyesabcgno")
    seg0, seg1 = examples_of(out, meta, "a.wav")
    # Segment [0, 1.2 s): "hi" at frame 1 (0.1 * 12.5 = 1.25), ends at frame 3; "yes" at frame 6, ends
    # at 11; "abcdef" at frame 12 (its 0 overwrites yes's in-word pad), cut by the segment end.
    assert seg0[0].tolist() == [0, h, i, 3, 3, 0, y, e, s, 3, 3, 0, a, b, c]
    # Segment [1.2, 1.9 s): "go" at frame 1; "no" at frame 2 (0.17 * 12.5) drops go's "o"; ends at 5.
    assert seg1[0].tolist() == [0, g, n, o, 3, 3, 3, 3, 3]


def test_metadata_counts_checksums_and_bad_inputs(toy, prepared):
    out, meta = prepared
    assert meta["frame_rate"] == 12.5 and meta["num_streams"] == 17 and len(meta["streams"]) == 17
    assert meta["num_examples"] == 4 and meta["num_frames"] == 15 + 9 + 13 + 13
    assert meta["num_sources"] == 9 and meta["num_skipped"] == 6
    assert meta["text_card"] == sentencepiece.SentencePieceProcessor(str(toy.tokenizer)).vocab_size()
    for shard in meta["shards"]:
        assert shards.sha256_file(out / shard["file"]) == shard["sha256"]
    reasons = {s["name"]: s.get("reason") for s in meta["sources"]}
    assert "c.wav: 1 channel(s), expected stereo" in reasons["c.wav"]
    assert "d.wav: missing wav file" in reasons["d.wav"]
    assert "e.json: malformed alignment file" in reasons["e.wav"]
    assert "f.json: missing alignment file" in reasons["f.wav"]
    assert "g.wav: duration 3.000 s in the jsonl disagrees with the audio (1.000 s)" in reasons["g.wav"]
    assert "train.jsonl:8: malformed jsonl line" in reasons[f"{toy.jsonl}:8"]
    b = next(s for s in meta["sources"] if s["name"] == "b.wav")
    assert b["status"] == "ok" and b["notes"] == ["resampled from 16000 Hz to 24000 Hz"]


def test_loader_pads_past_the_audio_with_minus_one(toy, prepared):
    out, _ = prepared
    vocab = sentencepiece.SentencePieceProcessor(str(toy.tokenizer)).vocab_size()
    ds = make_dataset(str(out), num_frames=15, card=2048, text_card=vocab, n_q=16, seed=0)
    first = next(make_eval_iterator(ds, batch_size=2))
    assert first.dtype == np.int32 and first.shape == (2, 17, 15)
    assert (first[1, :, 9:] == -1).all() and (first[1, :, :9] >= 0).all()
    with pytest.raises(ValueError, match="text_card 5"):
        make_dataset(str(out), num_frames=15, card=2048, text_card=5, n_q=16, seed=0)


def test_whole_files_keep_every_frame_and_word(toy, monkeypatch):
    """--duration_sec 0: one example per file with all of its words; streamed through Mimi when long."""
    monkeypatch.setattr(codec, "FULL_ENCODE_MAX_SEC", 0.5)  # every file here counts as long
    streamed = []
    real_streamed = codec.MimiEncoder._streamed
    def counting_streamed(self, x):
        streamed.append(x.shape[-1])
        return real_streamed(self, x)

    monkeypatch.setattr(codec.MimiEncoder, "_streamed", counting_streamed)
    out = toy.root / "whole"
    meta = run_prepare(toy, out, "--duration_sec", "0")
    assert streamed == [45600, 24000, 24000]  # a.wav, b.wav (resampled), h.wav: one call each
    assert meta["duration_sec"] == 0 and meta["num_examples"] == 3
    assert meta["max_frames_per_example"] == 24  # a.wav: 45600 samples, in shard 0 of 5
    (a,) = examples_of(out, meta, "a.wav")
    (b,) = examples_of(out, meta, "b.wav")
    assert a.shape == (17, 24) and b.shape == (17, 13)  # b: 2 chunks of 12 frames, cut back to its 13
    sp = sentencepiece.SentencePieceProcessor(str(toy.tokenizer))
    h, i, y, e, s, a_, b_, c, d, g, n, o = (sp.piece_to_id(ch) for ch in "hiyesabcdgno")
    # As the two 1.2 s segments, but "abcdef" runs on until "go" (frame 16) drops its "ef", and
    # "go" / "no" (past 1.2 s) are in: all the file's words.
    assert a[0].tolist() == [0, h, i, 3, 3, 0, y, e, s, 3, 3, 0, a_, b_, c, d, g, n, o] + [3] * 5
    pcm, _ = sphn.read(str(toy.data / "a.wav"))
    one_call = direct_codes(loaders.get_mimi(toy.mimi), pcm)
    # Streaming mode: as one call up to float rounding until Mimi's 250-step window fills (10 s).
    assert (a[1:] == one_call).mean() > 0.99


def test_strict_stops_at_the_first_bad_file(toy, capsys):
    out = toy.root / "strict"
    assert re.search(r"c\.wav: 1 channel\(s\).*--strict", prepare_error(toy, out, capsys, "--strict"))
    assert (out / shards.shard_name(0, 5)).is_file()  # a.wav, b.wav: finished before the stop
    assert not (out / shards.shard_name(1, 5)).exists() and not (out / "metadata.json").exists()


def test_resume_after_a_crash_redoes_only_unfinished_shards(toy, prepared, monkeypatch, capsys):
    _, reference = prepared
    out = toy.root / "resumed"
    real_write = shards.write_shard

    def crash_in_last_shard(path, examples):
        if "00004-of" in path.name:
            path.with_name(path.name + ".tmp").write_bytes(b"partial")
            raise KeyboardInterrupt("simulated kill")
        return real_write(path, examples)

    monkeypatch.setattr(shards, "write_shard", crash_in_last_shard)
    assert prepare.main(prepare_argv(toy, out)) == 130  # Ctrl-C: the runner's exit code
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("error: interrupted (Ctrl-C)")
    monkeypatch.setattr(shards, "write_shard", real_write)
    first = out / shards.shard_name(0, 5)  # damage a finished shard too: it must be redone
    first.write_bytes(first.read_bytes()[:-10])

    encoded = []
    real_encode = codec.MimiEncoder.encode
    def counting_encode(self, wavs):
        encoded.append(len(wavs))
        return real_encode(self, wavs)

    monkeypatch.setattr(codec.MimiEncoder, "encode", counting_encode)
    meta = run_prepare(toy, out)
    assert encoded == [1, 1, 1, 1]  # a.wav's two segments and b.wav (shard 0), h.wav (shard 4)
    assert meta["shards"] == reference["shards"] and meta["sources"] == reference["sources"]
    assert not list(out.glob("*.tmp"))

    encoded.clear()  # all done: nothing is encoded again
    assert run_prepare(toy, out)["shards"] == reference["shards"] and encoded == []
    assert re.search("other inputs.*duration_sec", prepare_error(toy, out, capsys, "--duration_sec", "2.0"))


def test_pretokenized_codes(tmp_path):
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 2048, size=(2, 17, 30))
    codes[:, 0] = rng.integers(0, 100, size=(2, 30))
    codes[1, :, 20:] = -1  # padding at the end of the second is dropped
    np.save(tmp_path / "codes.npy", codes)
    bad = codes.copy()
    bad[0, 3, 0] = 5000
    np.save(tmp_path / "bad.npy", bad)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "tttjax.data.prepare", "--codes", str(tmp_path / "codes.npy"),
         str(tmp_path / "bad.npy"), "--out", str(out), "--duration_sec", str(SEG), "--text_card", "100"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert proc.returncode == 0, proc.stderr
    assert "bad.npy: audio ids outside [-1, 2048)" in proc.stderr
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["num_skipped"] == 1 and meta["num_examples"] == 4
    src = PreparedSource(out)
    got = [src[i] for i in range(len(src))]
    want = [codes[0, :, :15], codes[0, :, 15:], codes[1, :, :15], codes[1, :, 15:20]]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_negative_duration_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        prepare.parse_args(["--codes", "a.npy", "--out", str(tmp_path), "--duration_sec", "-1"])
    assert "--duration_sec must be >= 0 (0: whole files)" in capsys.readouterr().err
