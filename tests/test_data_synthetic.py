"""The synthetic dataset: deterministic, in range, and with the structure a small model can learn."""

import numpy as np
import pytest

from tttjax.data import SyntheticDataset, make_dataset, num_frames


def test_num_frames():
    assert num_frames(100) == 1250 and num_frames(0.7) == 9 and num_frames(10.01) == 126


def test_deterministic_and_in_range():
    ds = SyntheticDataset(num_examples=20, num_frames=50, card=32, text_card=40, seed=1)
    again = SyntheticDataset(num_examples=20, num_frames=50, card=32, text_card=40, seed=1)
    other = SyntheticDataset(num_examples=20, num_frames=50, card=32, text_card=40, seed=2)
    assert len(ds) == 20
    for i in range(20):
        x = ds[i]
        assert x.shape == (17, 50) and x.dtype == np.int32
        np.testing.assert_array_equal(x, again[i])
        assert not np.array_equal(x, other[i])
        assert (0 <= x[0]).all() and (x[0] < 40).all() and (0 <= x[1:]).all() and (x[1:] < 32).all()
    assert not np.array_equal(ds[0], ds[1])
    with pytest.raises(IndexError):
        ds[20]


def test_learnable_structure():
    ds = make_dataset("synthetic:50", num_frames=64, card=32, text_card=40, n_q=16, seed=0).components[0][0]
    for i in range(len(ds)):
        x = ds[i]
        for speaker in (1, 9):
            step = np.diff(x[speaker]) % 32
            assert len(set(step)) == 1 and step[0] in (1, 2, 3)  # codebook 0 counts up
            for k in range(1, 8):  # codebook k = codebook k-1 + k
                np.testing.assert_array_equal(x[speaker + k], (x[speaker + k - 1] + k) % 32)
        text = x[0]
        markers = np.flatnonzero(text == 0)
        assert len(markers) >= 5
        assert all(text[m + 1] >= 4 for m in markers if m + 1 < len(text))  # 0 precedes a word
        words = np.flatnonzero(text[:-1] >= 4)
        assert all(text[t + 1] in (text[t] + 1, 3, 0) for t in words)  # words are consecutive ids
