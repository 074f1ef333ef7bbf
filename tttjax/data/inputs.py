"""Reading and checking users' files (moshi-finetune's format); every problem names the file."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tttjax.data.interleave import Alignment
from tttjax.data.streams import SAMPLE_RATE
from tttjax.errors import UserError


class BadInput(UserError):
    """A user file that prepare must skip (or stop on, with --strict)."""


@dataclass(frozen=True)
class Entry:
    """One line of the jsonl: `name` is the path as written, `wav` where it resolves."""

    name: str
    wav: Path
    duration: float


def parse_jsonl_line(jsonl: Path, lineno: int, line: str) -> Entry:
    """A `{"path": ..., "duration": ...}` line; relative paths are relative to the jsonl's folder."""
    where = f"{jsonl}:{lineno}"
    try:
        item = json.loads(line)
        name, duration = item["path"], float(item["duration"])
    except (ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{where}: malformed jsonl line ({e!r})") from None
    if not isinstance(name, str) or not math.isfinite(duration) or duration <= 0:
        raise BadInput(f"{where}: malformed jsonl line (path {name!r}, duration {duration})")
    return Entry(name, jsonl.parent / name, duration)


def read_stereo(entry: Entry, tolerance_sec: float) -> tuple[np.ndarray, list[str]]:
    """The wav as float32 [2, S] at 24 kHz (resampled if needed), and notes about what was done."""
    import sphn  # only prepare needs audio decoding

    if not entry.wav.is_file():
        raise BadInput(f"{entry.wav}: missing wav file")
    try:
        pcm, sample_rate = sphn.read(str(entry.wav))
    except Exception as e:  # sphn raises plain ValueError/OSError with terse messages
        raise BadInput(f"{entry.wav}: unreadable audio ({e})") from None
    if pcm.ndim != 2 or pcm.shape[0] != 2:
        channels = 1 if pcm.ndim == 1 else pcm.shape[0]
        raise BadInput(
            f"{entry.wav}: {channels} channel(s), expected stereo (left = Moshi, right = user)"
        )
    if pcm.shape[1] == 0:
        raise BadInput(f"{entry.wav}: empty audio")
    actual = pcm.shape[1] / sample_rate
    if abs(actual - entry.duration) > tolerance_sec:
        raise BadInput(
            f"{entry.wav}: duration {entry.duration:.3f} s in the jsonl disagrees with the audio "
            f"({actual:.3f} s)"
        )
    notes = []
    if sample_rate != SAMPLE_RATE:
        length = round(pcm.shape[1] * SAMPLE_RATE / sample_rate)
        # sphn's resampler pads its output to whole chunks: cut back to the true length.
        pcm = sphn.resample(pcm, src_sample_rate=sample_rate, dst_sample_rate=SAMPLE_RATE)[:, :length]
        notes.append(f"resampled from {sample_rate} Hz to {SAMPLE_RATE} Hz")
    return np.ascontiguousarray(pcm, dtype=np.float32), notes


def read_alignments(wav: Path) -> list[Alignment]:
    """The `alignments` of the json next to the wav: [[word, [start_s, end_s], speaker], ...]."""
    path = wav.with_suffix(".json")
    if not path.is_file():
        raise BadInput(f"{path}: missing alignment file")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: malformed alignment file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("alignments"), list):
        raise BadInput(f'{path}: malformed alignment file (no "alignments" list)')
    out = []
    for i, item in enumerate(data["alignments"]):
        try:
            word, (start, end), speaker = item
            start, end = float(start), float(end)
            ok = isinstance(word, str) and isinstance(speaker, str)
            ok = ok and math.isfinite(start) and math.isfinite(end) and start >= 0
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise BadInput(f"{path}: malformed alignment #{i}: {item!r}")
        out.append((word, start, end, speaker))
    return out
