"""Text stream from word alignments, exactly as moshi-finetune's Interleaver builds it.

Rules (finetune/data/interleaver.py @ 2acc879, keep_main_only=True, keep_and_shift=False):
a word's tokens go one per frame from the first frame t with start * 12.5 < t + 1; the frame
before a word's first token becomes 0 (end of padding) if it held pad (3); frames up to the
word's end that carry no token stay 3; a word starting while tokens of the previous one are
still pending drops them. Frames past the audio are -1 (moshi-finetune writes 3 there by a quirk).
"""

from collections import deque
from typing import Protocol, Sequence

import numpy as np

from tttjax.data.streams import END_OF_PAD, FRAME_RATE, TEXT_PAD

# (word, start_s, end_s, speaker), as read from an alignment file.
Alignment = tuple[str, float, float, str]
# (token ids, start_s, end_s) in segment time.
TokenizedWord = tuple[Sequence[int], float, float]


class Tokenizer(Protocol):
    def encode(self, text: list[str]) -> list[list[int]]: ...


def tokenize_word(tokenizer: Tokenizer, word: str) -> list[int]:
    """moshi-finetune's `tokenize(word.strip(), bos=False)`: newline parts joined by the newline piece."""
    parts = tokenizer.encode(word.strip().split("\n"))
    tokens = list(parts[0])
    if len(parts) > 1:
        newline = tokenizer.encode(["\n"])[0][-1:]  # empty if the tokenizer drops newlines
        for part in parts[1:]:
            tokens += [*newline, *part]
    return tokens


def text_stream(words: Sequence[TokenizedWord], num_frames: int) -> np.ndarray:
    """The text row for `num_frames` frames of audio; `words` sorted by start, in segment time."""
    out = [TEXT_PAD] * num_frames
    pending: deque = deque()
    last_word_end = -1
    i = 0
    for t in range(num_frames):
        while i < len(words) and words[i][1] * FRAME_RATE < t + 1:
            pending = deque(words[i][0])  # drops what is left of the previous word
            last_word_end = int(words[i][2] * FRAME_RATE)
            i += 1
        if pending:
            if t > 0 and out[t - 1] == TEXT_PAD:
                out[t - 1] = END_OF_PAD
            out[t] = pending.popleft()
        elif t <= last_word_end:
            out[t] = TEXT_PAD
    return np.asarray(out, dtype=np.int64)


def tokenize_alignments(
    tokenizer: Tokenizer, alignments: Sequence[Alignment], main_speaker: str
) -> list[TokenizedWord]:
    """Main-speaker words with a positive duration, sorted by start (the order moshi-finetune uses)."""
    words = sorted(alignments, key=lambda a: a[1])
    return [
        (tokenize_word(tokenizer, w), start, end)
        for w, start, end, speaker in words
        if speaker == main_speaker and start < end
    ]


def segment_words(
    words: Sequence[TokenizedWord], start_sec: float, duration_sec: float
) -> list[TokenizedWord]:
    """Words starting in [start_sec, start_sec + duration_sec), shifted to segment time."""
    end_sec = start_sec + duration_sec
    return [(toks, s - start_sec, e - start_sec) for toks, s, e in words if start_sec <= s < end_sec]
