"""The 17-stream code layout shared by prepare and the loader (moshi's LMModel conventions)."""

import math

FRAME_RATE = 12.5  # Mimi frames per second
SAMPLE_RATE = 24000  # Mimi's input sample rate
CODEBOOKS_PER_SPEAKER = 8
NUM_STREAMS = 1 + 2 * CODEBOOKS_PER_SPEAKER  # text, Moshi's 8 codebooks, the user's 8
MIMI_CARD = 2048

TEXT_PAD = 3  # no text at this frame
END_OF_PAD = 0  # the frame before a word's first token
NO_TOKEN = -1  # zero embedding, no loss: padding and frames past the audio

STREAM_NAMES = ["text"] + [f"moshi_q{k}" for k in range(CODEBOOKS_PER_SPEAKER)] + [
    f"user_q{k}" for k in range(CODEBOOKS_PER_SPEAKER)
]


def num_frames(duration_sec: float) -> int:
    """Frames in `duration_sec` seconds, as moshi-finetune counts them (ceil)."""
    return math.ceil(duration_sec * FRAME_RATE)
