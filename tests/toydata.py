"""Small moshi-finetune-format inputs built locally: stereo wavs, alignments, a sentencepiece model
and a random-weight Mimi. The tests and bench/data_pipeline.py use them to run prepare without
downloads; they are also a template of the expected input layout.
"""

import json
from pathlib import Path

import numpy as np

from tttjax.data.streams import SAMPLE_RATE

# Moshi's text tokenizer reserves 0 (unk), 1 (bos), 2 (eos), 3 (pad); the toy one does too.
_SPM_SPECIAL = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=3)


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


def train_tokenizer(prefix: Path, sentences: list[str], vocab_size: int = 48) -> Path:
    """A character-level sentencepiece model (each word's tokens are easy to work out by hand)."""
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(prefix), vocab_size=vocab_size,
        model_type="char", character_coverage=1.0, add_dummy_prefix=False, minloglevel=2, **_SPM_SPECIAL,
    )
    return prefix.with_suffix(".model")


def save_random_mimi(path: Path, seed: int = 0) -> Path:
    """A randomly initialised Mimi whose codebooks are filled (an empty one maps every frame to one code)."""
    import torch
    from moshi.models import loaders
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    mimi = loaders.get_mimi(None)
    for name, buf in mimi.named_buffers():
        if name.endswith("embedding_sum"):
            buf.copy_(torch.randn_like(buf) * 0.01)
        elif name.endswith("_initialized"):
            buf.fill_(1)
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(path))
    return path
