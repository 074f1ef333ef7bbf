"""Small moshi-finetune-format inputs built locally for the tests and bench/data_pipeline.py:
stereo wavs and word alignments (a template of the input layout prepare expects). The random Mimi
and the tokenizer are tttjax.data.offline's.
"""

import json
from pathlib import Path

import numpy as np

from tttjax.data.streams import SAMPLE_RATE


def speech_like(
    rng: np.random.Generator, seconds: float, sample_rate: int = SAMPLE_RATE, channels: int = 2
) -> np.ndarray:
    """float32 [channels, S]: gated harmonic tones plus noise, different per channel."""
    n = round(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    out = []
    for _ in range(channels):
        f0 = rng.uniform(90, 250)
        tone = sum(np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 6.3)) / h for h in range(1, 5))
        gate = (np.sin(2 * np.pi * rng.uniform(1.5, 4) * t) > -0.3).astype(np.float32)
        out.append(0.2 * tone * gate + 0.01 * rng.standard_normal(n))
    return np.stack(out).astype(np.float32)


def write_wav(path: Path, pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    import sphn

    sphn.write_wav(str(path), np.ascontiguousarray(pcm, dtype=np.float32), sample_rate)


def write_alignments(wav: Path, words: list[tuple[str, float, float, str]]) -> None:
    """a.json beside a.wav: {"alignments": [[word, [start, end], speaker], ...]}."""
    items = [[w, [s, e], spk] for w, s, e, spk in words]
    wav.with_suffix(".json").write_text(json.dumps({"alignments": items}))


def write_jsonl(path: Path, entries: list[tuple[str, float]]) -> None:
    path.write_text("".join(json.dumps({"path": p, "duration": d}) + "\n" for p, d in entries))
