"""A built-in dataset with learnable structure, for smoke runs and configs/tiny.py (no files needed).

Example i is generated from (seed, i) alone, so it is deterministic and random-access. Structure a
small model can pick up within ~100 steps:
- each speaker's codebook 0 counts up by a per-example step in {1, 2, 3} (mod card): predictable
  from the previous frames;
- codebook k at a frame is codebook k-1 at that frame plus k (mod card): predictable by the
  depformer from the codebook before it;
- text: runs of pad (3) of random length, the last one replaced by 0 (end of padding), then a
  word of 1..4 consecutive ids (w, w+1, ...), like the interleaved text of real data.
"""

import numpy as np

from tttjax.data.streams import END_OF_PAD, TEXT_PAD
from tttjax.errors import UserError

_FIRST_WORD_ID = 4  # ids 0..3 are moshi's special text tokens


class SyntheticDataset:
    """grain-compatible random-access source of np.int32 [1 + n_q, num_frames] examples."""

    def __init__(
        self, *, num_examples: int, num_frames: int, card: int, text_card: int, n_q: int = 16, seed: int = 0
    ):
        if num_examples <= 0 or num_frames <= 0 or n_q <= 0 or n_q % 2:
            raise UserError(
                f"synthetic: need positive num_examples, num_frames and an even n_q, got {num_examples}, "
                f"{num_frames}, {n_q}"
            )
        if card < 4 or text_card < _FIRST_WORD_ID + 4:
            raise UserError(f"synthetic: card {card} / text_card {text_card} too small")
        self.num_examples, self.num_frames = num_examples, num_frames
        self.card, self.text_card, self.n_q, self.seed = card, text_card, n_q, seed

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"synthetic: index {index} out of range [0, {self.num_examples})")
        rng = np.random.default_rng([self.seed, index])
        codes = np.empty((1 + self.n_q, self.num_frames), np.int32)
        codes[0] = self._text(rng)
        per_speaker = self.n_q // 2
        t = np.arange(self.num_frames)
        for speaker in range(2):
            start, step = rng.integers(self.card), rng.integers(1, 4)
            row = (start + step * t) % self.card
            for k in range(per_speaker):
                row = (row + k) % self.card
                codes[1 + speaker * per_speaker + k] = row
        return codes

    def _text(self, rng: np.random.Generator) -> np.ndarray:
        out = np.full(self.num_frames, TEXT_PAD, np.int32)
        t = 0
        while True:
            t += int(rng.integers(2, 7))  # a run of pads
            length = int(rng.integers(1, 5))
            if t + length > self.num_frames:
                return out
            out[t - 1] = END_OF_PAD
            first = int(rng.integers(_FIRST_WORD_ID, self.text_card - length + 1))
            out[t : t + length] = np.arange(first, first + length)
            t += length
