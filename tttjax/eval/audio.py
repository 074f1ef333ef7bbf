"""Mimi codes of the paper-metric wavs, through the data code's MimiEncoder, cached on disk.

A wav's codes depend on its bytes and on the Mimi weights, so the cache key is
(sha256 of the wav file, sha256 of the Mimi file): a changed file or a different Mimi never hits
a stale entry. Audio is read with sphn, mixed down to mono and resampled to 24 kHz.

Each wav becomes Moshi-stream codes [8, F], F = ceil(samples / 1920). Mono wavs of one length are
packed two per stereo call (MimiEncoder encodes each channel on its own), so no padding enters
Mimi. The silence codes of a length (the encoding of zeros, for the user stream) are cached too.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from tttjax.data.shards import sha256_file
from tttjax.data.streams import CODEBOOKS_PER_SPEAKER, SAMPLE_RATE
from tttjax.errors import UserError


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tttjax" / "eval_codes"


def read_mono(path: str | Path) -> np.ndarray:
    """float32 [S] at 24 kHz."""
    import sphn

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: wav not found")
    try:
        pcm, sample_rate = sphn.read(str(path))
    except Exception as e:  # sphn raises terse ValueError/OSError
        raise UserError(f"{path}: unreadable audio ({e})") from None
    pcm = np.asarray(pcm, np.float32)
    pcm = pcm.mean(axis=0) if pcm.ndim == 2 else pcm
    if pcm.size == 0:
        raise UserError(f"{path}: empty audio")
    if sample_rate != SAMPLE_RATE:
        length = round(pcm.shape[-1] * SAMPLE_RATE / sample_rate)
        # sphn's resampler pads its output to whole chunks: cut back to the true length.
        pcm = sphn.resample(pcm[None], src_sample_rate=sample_rate, dst_sample_rate=SAMPLE_RATE)[0, :length]
    return np.ascontiguousarray(pcm, np.float32)


class CodeCache:
    """wav path -> Moshi-stream codes [8, F] (and silence codes of the same length)."""

    def __init__(self, mimi_spec: str, cache_dir: str | Path | None = None, *, batch_size: int = 8,
                 device: str | None = None):
        self.mimi_spec = mimi_spec
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.batch_size = max(1, batch_size)
        self.device = device
        self._mimi_file: Path | None = None
        self._mimi_key: str | None = None
        self._encoder = None
        self.encoded = 0  # wavs encoded by Mimi in this process (cache misses)
        self.hits = 0

    # -- the Mimi identity (resolved lazily: a fully cached run never needs torch) ---------------
    @property
    def mimi_key(self) -> str:
        if self._mimi_key is None:
            from tttjax.data import codec

            self._mimi_file = codec.resolve_mimi(self.mimi_spec)
            self._mimi_key = sha256_file(self._mimi_file)[:16]
        return self._mimi_key

    @property
    def encoder(self):
        if self._encoder is None:
            from tttjax.data.codec import MimiEncoder

            self.mimi_key  # noqa: B018 - resolves the file
            self._encoder = MimiEncoder(self._mimi_file, self.device)
        return self._encoder

    def _entry(self, digest: str) -> Path:
        return self.cache_dir / self.mimi_key / digest[:2] / f"{digest}.npz"

    def _silence_entry(self, samples: int) -> Path:
        return self.cache_dir / self.mimi_key / "silence" / f"{samples}.npz"

    @staticmethod
    def _save(path: Path, codes: np.ndarray, samples: int) -> None:
        """Atomically (write + rename), so a killed run never leaves a truncated entry."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, codes=codes.astype(np.int16), samples=np.int64(samples))
        tmp.replace(path)

    @staticmethod
    def _load(path: Path) -> tuple[np.ndarray, int]:
        with np.load(path) as data:
            return data["codes"].astype(np.int32), int(data["samples"])

    # -- encoding --------------------------------------------------------------------------------
    def _encode_group(self, pcms: list[np.ndarray]) -> list[np.ndarray]:
        """Mono signals of one length -> [8, F] codes each; two per stereo call."""
        out = []
        per_call = 2 * self.batch_size
        for start in range(0, len(pcms), per_call):
            chunk = pcms[start:start + per_call]
            padded = chunk + [np.zeros_like(chunk[0])] * (len(chunk) % 2)
            stereo = [np.stack(padded[i:i + 2]) for i in range(0, len(padded), 2)]
            codes = self.encoder.encode(stereo)  # [n, 16, F]: channel 0 then channel 1
            flat = [c for pair in codes for c in (pair[:CODEBOOKS_PER_SPEAKER], pair[CODEBOOKS_PER_SPEAKER:])]
            out += flat[:len(chunk)]
        return out

    def codes(self, paths: list[str], *, with_silence: bool = False, progress=None) -> dict[str, tuple[np.ndarray, int]]:
        """{path: (codes [8, F] int32, number of 24 kHz samples)} for the unique paths given.

        with_silence: also make sure the silence codes of each new length get cached (they ride
        along in the same Mimi calls).
        """
        unique = list(dict.fromkeys(paths))
        out: dict[str, tuple[np.ndarray, int]] = {}
        pending: dict[int, list[tuple[str, str, np.ndarray]]] = defaultdict(list)
        for path in unique:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: wav not found")
            digest = sha256_file(Path(path))
            entry = self._entry(digest)
            if entry.is_file():
                out[path] = self._load(entry)
                self.hits += 1
            else:
                pcm = read_mono(path)
                pending[pcm.shape[0]].append((path, digest, pcm))
        for samples, group in sorted(pending.items()):
            signals = [g[2] for g in group]
            silent = with_silence and not self._silence_entry(samples).is_file()
            encoded = self._encode_group(signals + ([np.zeros(samples, np.float32)] if silent else []))
            for (path, digest, _), codes in zip(group, encoded):
                self._save(self._entry(digest), codes, samples)
                out[path] = (codes.astype(np.int32), samples)
                self.encoded += 1
                if progress is not None:
                    progress(1)
            if silent:
                self._save(self._silence_entry(samples), encoded[-1], samples)
        return out

    def silence(self, samples: int) -> np.ndarray:
        """Mimi codes [8, F] of `samples` zeros."""
        entry = self._silence_entry(samples)
        if entry.is_file():
            return self._load(entry)[0]
        codes = self._encode_group([np.zeros(samples, np.float32)])[0]
        self._save(entry, codes, samples)
        return codes.astype(np.int32)
