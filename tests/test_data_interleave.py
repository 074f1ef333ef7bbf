"""The text stream against hand-worked frames (moshi-finetune's interleaver rules)."""

from tttjax.data.interleave import (
    segment_words,
    text_stream,
    tokenize_alignments,
    tokenize_word,
)


class CharTokenizer:
    """moshi-finetune's test mock: one token per character (its code point)."""

    def encode(self, texts):
        return [[ord(c) for c in t] for t in texts]


def words(*items):
    return [(tokenize_word(CharTokenizer(), w), s, e) for w, s, e in items]


def test_moshi_finetune_example():
    # Words at 0.3 s and 0.8 s, 20 frames: the example from moshi-finetune's interleaver.
    got = text_stream(words(("hel", 0.3, 0.5), ("the", 0.8, 1.0)), 20)
    assert got.tolist() == [3, 3, 0, 104, 101, 108, 3, 3, 3, 0, 116, 104, 101, 3, 3, 3, 3, 3, 3, 3]


def test_drop_pending_in_word_pad_and_first_frame():
    # "abcde" at frame 0 (no end-of-pad marker before frame 0) loses c, d, e when "xy" starts at
    # frame 2 (0.17 * 12.5 = 2.125); no 0 before "x" since frame 1 holds a token; "xy" ends at
    # frame int(0.6 * 12.5) = 7, so frames 4..7 are in-word pads; "z" starts at frame 9 and frame 8
    # (a pad) becomes 0.
    got = text_stream(words(("abcde", 0.0, 0.1), ("xy", 0.17, 0.6), ("z", 0.75, 0.8)), 12)
    assert got.tolist() == [97, 98, 120, 121, 3, 3, 3, 3, 0, 122, 3, 3]


def test_main_speaker_sorting_and_segment_window():
    alignments = [
        ("b", 1.5, 1.7, "SPEAKER_MAIN"),
        ("a", 0.2, 0.4, "SPEAKER_MAIN"),
        ("u", 0.3, 0.5, "SPEAKER_OTHER"),  # the user's words are not in Moshi's text stream
        ("z", 0.6, 0.6, "SPEAKER_MAIN"),  # zero duration: dropped, as moshi-finetune does
        ("c", 2.5, 2.6, "SPEAKER_MAIN"),
    ]
    tokenized = tokenize_alignments(CharTokenizer(), alignments, "SPEAKER_MAIN")
    assert tokenized == [([97], 0.2, 0.4), ([98], 1.5, 1.7), ([99], 2.5, 2.6)]
    # Segment [1.0, 2.5): words starting in it, shifted to segment time; "c" starts at its end.
    assert segment_words(tokenized, 1.0, 1.5) == [([98], 0.5, 0.7)]


def test_tokenize_word_strips_and_joins_lines():
    assert tokenize_word(CharTokenizer(), " hi ") == [104, 105]
    assert tokenize_word(CharTokenizer(), "a\nb") == [97, 10, 98]
