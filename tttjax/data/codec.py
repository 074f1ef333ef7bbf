"""Mimi (moshi's PyTorch codec) and the text tokenizer for prepare; the only torch user in tttjax.data."""

import re
from pathlib import Path

import numpy as np
import sentencepiece
import torch
from moshi.models import loaders

from tttjax.data.streams import CODEBOOKS_PER_SPEAKER
from tttjax.errors import UserError


def resolve(spec: str, default_name: str) -> Path:
    """A local file, `hf://org/repo/file`, or a Hugging Face repo id (then its `default_name`)."""
    if Path(spec).is_file():
        return Path(spec)
    if spec.startswith("hf://"):
        return loaders.hf_get(spec)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        return loaders.hf_get(default_name, spec)
    raise UserError(f"{spec}: no such file, and not a Hugging Face repo id or hf:// path")


def resolve_tokenizer(spec: str) -> Path:
    return resolve(spec, loaders.TEXT_TOKENIZER_NAME)


def resolve_mimi(spec: str) -> Path:
    return resolve(spec, loaders.MIMI_NAME)


def load_tokenizer(path: Path) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(str(path))


# One Mimi call's memory grows with its length and the square of it (on CPU 6 GB for a 120 s stereo
# segment, ~200 GB for 30 min), so longer segments (whole files) are encoded in streaming mode,
# STREAM_CHUNK_FRAMES frames a call.
FULL_ENCODE_MAX_SEC = 120.0
STREAM_CHUNK_FRAMES = 12


class MimiEncoder:
    """Encodes stereo segments to [16, F] codes (Moshi's codebooks 0..7, then the user's)."""

    def __init__(self, weight: Path, device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.mimi = loaders.get_mimi(weight, device=self.device, num_codebooks=CODEBOOKS_PER_SPEAKER)

    @torch.no_grad()
    def encode(self, wavs: list[np.ndarray]) -> np.ndarray:
        """wavs: n float32 [2, S] arrays of one length S -> int [n, 16, ceil(S / 1920)]."""
        x = torch.from_numpy(np.stack(wavs)).to(self.device)  # [n, 2, S]
        n, channels, samples = x.shape
        x = x.reshape(n * channels, 1, samples)
        full = samples <= FULL_ENCODE_MAX_SEC * self.mimi.sample_rate
        codes = self.mimi.encode(x) if full else self._streamed(x)  # [2n, 8, F]
        return codes.reshape(n, channels * CODEBOOKS_PER_SPEAKER, -1).cpu().numpy()

    def _streamed(self, x: torch.Tensor) -> torch.Tensor:
        """Mimi's streaming encode of x [B, 1, S]: memory stays flat for hours of audio. Not bit-equal
        to one call: the first steps of a chunk see up to 23 fewer of the 250 past steps of Mimi's
        attention (moshi's ring KV cache holds 250); with a random Mimi, 0.1% of the tokens differ."""
        frame = self.mimi.frame_size
        frames = -(-x.shape[-1] // frame)
        chunk = STREAM_CHUNK_FRAMES * frame
        x = torch.nn.functional.pad(x, (0, -x.shape[-1] % chunk))  # one shape for CUDA graphs; causal
        with self.mimi.streaming(x.shape[0]):
            codes = [self.mimi.encode(x[..., s : s + chunk]) for s in range(0, x.shape[-1], chunk)]
        return torch.cat(codes, dim=-1)[..., :frames]
