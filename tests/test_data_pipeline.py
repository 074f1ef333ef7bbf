"""The grain pipeline: exact resume for 1 and 2 processes, epochs, segments, mixtures, eval, sources."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tttjax.data import (
    Mixture,
    make_batch_iterator,
    make_dataset,
    make_eval_iterator,
    prepare,
)
from tttjax.data.datasets import _weighted_items
from tttjax.data.sources import parse_tfds_spec


class Ramp:
    """Example i is [17, length] with code (base + i) * 1000 + frame (shows which example and window)."""

    def __init__(self, n, length=8, lengths=None, base=0):
        self.lengths = lengths or [length] * n
        self.base = base

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        n = self.lengths[i]
        return np.broadcast_to((self.base + i) * 1000 + np.arange(n), (17, n)).copy()


def ids(batch):
    return (batch[:, 0, 0] // 1000).tolist()


def take(it, n):
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def prepared_codes(tmp_path_factory):
    """A DATA_DIR prepared from pre-tokenized codes: 15 examples of 15 or 10 frames."""
    root = tmp_path_factory.mktemp("codes")
    codes = np.random.default_rng(0).integers(0, 100, size=(5, 17, 40))
    np.save(root / "codes.npy", codes)
    prepare.main(["--codes", str(root / "codes.npy"), "--out", str(root / "data"), "--duration_sec", "1.2",
                  "--text_card", "100", "--files_per_shard", "1"])
    return str(root / "data")


@pytest.fixture(scope="module")
def mixture(prepared_codes):
    spec = f"synthetic:7:0.6,{prepared_codes}:0.4"
    return make_dataset(spec, num_frames=12, card=2048, text_card=100, n_q=16, seed=3)


def test_resume_is_exact_for_one_and_two_processes(mixture):
    steps = 8
    reference = take(make_batch_iterator(mixture, global_batch_size=4, start_step=0, seed=11), steps)
    assert all(b.shape == (4, 17, 12) and b.dtype == np.int32 for b in reference)
    assert len({b.tobytes() for b in reference}) == steps
    for k in (0, 3, 6):
        resumed = take(make_batch_iterator(mixture, global_batch_size=4, start_step=k, seed=11), steps - k)
        for s, batch in enumerate(resumed, start=k):
            np.testing.assert_array_equal(batch, reference[s])
        procs = [
            make_batch_iterator(
                mixture, global_batch_size=4, start_step=k, seed=11, process_index=p, process_count=2
            )
            for p in range(2)
        ]
        for s in range(k, steps):
            local = [next(it) for it in procs]
            assert all(b.shape == (2, 17, 12) for b in local)
            np.testing.assert_array_equal(np.concatenate(local), reference[s])
    other_seed = next(make_batch_iterator(mixture, global_batch_size=4, start_step=0, seed=12))
    assert not np.array_equal(other_seed, reference[0])


def test_workers_give_the_same_batches(mixture):
    want = take(make_batch_iterator(mixture, global_batch_size=4, start_step=2, seed=5), 3)
    got = take(make_batch_iterator(mixture, global_batch_size=4, start_step=2, seed=5, num_workers=2), 3)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_global_shuffle_reshuffles_each_epoch():
    it = make_batch_iterator(Ramp(10), global_batch_size=5, start_step=0, seed=0)
    epochs = [sum((ids(b) for b in take(it, 2)), []) for _ in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3 and epochs[0] != list(range(10))
    plain = make_batch_iterator(Ramp(10), global_batch_size=5, start_step=0, seed=0, shuffle=False)
    assert sum((ids(b) for b in take(plain, 4)), []) == list(range(10)) * 2


def test_random_segments_and_minus_one_padding():
    data = Mixture(((Ramp(2, lengths=[40, 5]), 1.0),), num_frames=10)
    batches = take(make_batch_iterator(data, global_batch_size=2, start_step=0, seed=0), 20)
    offsets = set()
    for b in batches:
        for row in b:
            if row[0, 0] // 1000 == 1:  # the short example: 5 frames, then -1
                np.testing.assert_array_equal(row[:, :5], np.broadcast_to(1000 + np.arange(5), (17, 5)))
                assert (row[:, 5:] == -1).all()
            else:  # a contiguous 10-frame window of the 40-frame example
                start = row[0, 0]
                np.testing.assert_array_equal(row, np.broadcast_to(start + np.arange(10), (17, 10)))
                offsets.add(int(start))
    assert len(offsets) > 5 and max(offsets) <= 30


def test_mixture_follows_the_weights():
    data = Mixture(((Ramp(5), 3.0), (Ramp(50, base=100), 1.0)), num_frames=8)
    it = make_batch_iterator(data, global_batch_size=8, start_step=0, seed=0)
    rows = sum((ids(b) for b in take(it, 10)), [])
    from_a = [i for i in rows if i < 100]
    assert len(from_a) == 60  # grain mixes deterministically in proportion 3:1
    assert sorted(from_a[:15]) == sorted(list(range(5)) * 3)  # a's epochs go on while b is drawn


def test_eval_pass_is_finite_unshuffled_and_padded():
    data = Ramp(7)
    batches = list(make_eval_iterator(data, batch_size=4))
    assert [b.shape for b in batches] == [(4, 17, 8), (4, 17, 8)]
    assert ids(batches[0]) == [0, 1, 2, 3] and ids(batches[1])[:3] == [4, 5, 6]
    assert (batches[1][3] == -1).all()
    again = list(make_eval_iterator(data, batch_size=4))
    assert all(np.array_equal(x, y) for x, y in zip(again, batches))
    halves = [list(make_eval_iterator(data, batch_size=4, process_index=p, process_count=2)) for p in range(2)]
    for k, batch in enumerate(batches):
        np.testing.assert_array_equal(np.concatenate([halves[0][k], halves[1][k]]), batch)


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not a positive multiple of process_count 3"):
        make_batch_iterator(Ramp(4), global_batch_size=4, start_step=0, seed=0, process_count=3)
    with pytest.raises(ValueError, match="process_index 2"):
        make_eval_iterator(Ramp(4), batch_size=4, process_index=2, process_count=2)
    kw = dict(num_frames=8, card=32, text_card=40, n_q=16, seed=0)
    with pytest.raises(ValueError, match=f"{tmp_path}/nope: no such data dir"):
        make_dataset(str(tmp_path / "nope"), **kw)
    with pytest.raises(ValueError, match=f"{tmp_path}: not a prepared data dir"):
        make_dataset(str(tmp_path), **kw)
    with pytest.raises(ValueError, match="weight of 'synthetic' must be positive"):
        make_dataset("synthetic:0.0", **kw)


def test_prepared_dir_must_fit_the_model(prepared_codes):
    with pytest.raises(ValueError, match="do not fit card 32"):
        make_dataset(prepared_codes, num_frames=8, card=32, text_card=100, n_q=16, seed=0)
    with pytest.raises(ValueError, match="17 streams, the model has 9"):
        make_dataset(prepared_codes, num_frames=8, card=2048, text_card=100, n_q=8, seed=0)


@pytest.fixture(scope="module")
def whole_files(tmp_path_factory):
    """Two conversations of 3000 and 5000 frames prepared whole (--duration_sec 0), one shard each."""
    root = tmp_path_factory.mktemp("whole")
    rng = np.random.default_rng(2)
    codes = [rng.integers(0, 100, size=(17, n)) for n in (3000, 5000)]
    for k, c in enumerate(codes):
        np.save(root / f"{k}.npy", c)
    argv = ["--codes", str(root / "0.npy"), str(root / "1.npy"), "--out", str(root / "data"), "--duration_sec", "0",
            "--text_card", "100", "--files_per_shard", "1"]
    prepare.main(argv)
    return root / "data", codes, argv


def test_whole_files_are_kept_whole_and_padded(whole_files):
    out, codes, argv = whole_files
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["duration_sec"] == 0 and meta["num_examples"] == 2
    assert meta["max_frames_per_example"] == 5000  # the longest, from the second shard
    (out / "metadata.json").unlink()
    prepare.main(argv)  # a resume that writes no shard still finds the longest in the manifests
    assert json.loads((out / "metadata.json").read_text()) == meta

    data = make_dataset(str(out), num_frames=6000, card=2048, text_card=100, n_q=16, seed=0)
    (batch,) = take(make_batch_iterator(data, global_batch_size=2, start_step=0, seed=0, shuffle=False), 1)
    assert batch.shape == (2, 17, 6000)
    for row, c in zip(batch, codes, strict=True):
        np.testing.assert_array_equal(row[:, :c.shape[1]], c)  # whole: no cut at prepare time
        assert (row[:, c.shape[1]:] == -1).all()


def test_cut_data_asked_for_longer_windows_is_refused(prepared_codes):
    """A dir cut at 15 frames (1.2 s) trained on 20-frame windows would be -1 past every cut."""
    data = make_dataset(prepared_codes, num_frames=20, card=2048, text_card=100, n_q=16, seed=0)
    with pytest.raises(ValueError) as err:
        make_batch_iterator(data, global_batch_size=2, start_step=0, seed=0)
    message = str(err.value)
    assert message.startswith(f"{prepared_codes}: prepared with --duration_sec 1.2 (examples of at most 15 "
                              f"frames), but training asks for 20 frames; re-prepare it with --duration_sec 0")
    assert "\n" not in message and message.endswith("or train with duration_sec <= 1.2")
    first = next(make_eval_iterator(data, batch_size=2))  # eval reads examples from their start: padded
    assert first.shape == (2, 17, 20) and (first[:, :, 15:] == -1).all() and (first[:, :, :15] >= 0).all()


def test_spec_parsing():
    assert _weighted_items("synthetic") == [("synthetic", 1.0)]
    assert _weighted_items("synthetic:100") == [("synthetic:100", 1.0)]
    assert _weighted_items("synthetic:100:0.25,/d/x:3") == [("synthetic:100", 0.25), ("/d/x", 3.0)]
    assert _weighted_items("tfds:ds:1.0.0:train[:90%]:0.5") == [("tfds:ds:1.0.0:train[:90%]", 0.5)]
    assert parse_tfds_spec("ds") == ("ds", "train")
    assert parse_tfds_spec("ds/cfg:1.0.0:train[:90%]") == ("ds/cfg:1.0.0", "train[:90%]")
    assert parse_tfds_spec("ds:validation") == ("ds", "validation")


def test_tfds_source_through_the_pipeline(tmp_path, monkeypatch):
    """A real TFDS ArrayRecord dataset (written without TensorFlow) read through tfds.data_source."""
    from tttjax.data.tfds_writer import write_tfds

    examples = [np.full((17, 6 + i), i, np.int32) for i in range(4)]
    written = write_tfds(examples, tmp_path, "moshi_codes", split="dev")
    assert written == tmp_path / "moshi_codes" / "1.0.0"
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    data = make_dataset("tfds:moshi_codes:1.0.0:dev", num_frames=8, card=32, text_card=40, n_q=16, seed=0)
    batch = np.concatenate(list(make_eval_iterator(data, batch_size=4)))
    rows = sorted(batch.tolist(), key=lambda r: r[0][0])  # TFDS shuffles the examples when writing
    assert batch.shape == (4, 17, 8) and rows[3][0] == [3] * 8
    assert rows[0][0] == [0] * 6 + [-1, -1]

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # not installed
    with pytest.raises(ValueError, match="needs tensorflow-datasets"):
        make_dataset("tfds:moshi_codes", num_frames=8, card=32, text_card=40, n_q=16, seed=0)


def test_import_does_not_pull_torch():
    code = "import sys, tttjax.data; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
