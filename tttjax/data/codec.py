"""Mimi (moshi's PyTorch codec) and the text tokenizer for prepare; the only torch user in tttjax.data."""

import re
from pathlib import Path

import numpy as np
import sentencepiece
import torch
from moshi.models import loaders

from tttjax.data.streams import CODEBOOKS_PER_SPEAKER


def resolve(spec: str, default_name: str) -> Path:
    """A local file, `hf://org/repo/file`, or a Hugging Face repo id (then its `default_name`)."""
    if Path(spec).is_file():
        return Path(spec)
    if spec.startswith("hf://"):
        return loaders.hf_get(spec)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        return loaders.hf_get(default_name, spec)
    raise ValueError(f"{spec}: no such file, and not a Hugging Face repo id or hf:// path")


def resolve_tokenizer(spec: str) -> Path:
    return resolve(spec, loaders.TEXT_TOKENIZER_NAME)


def resolve_mimi(spec: str) -> Path:
    return resolve(spec, loaders.MIMI_NAME)


def load_tokenizer(path: Path) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(str(path))


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
        codes = self.mimi.encode(x.reshape(n * channels, 1, samples))  # [2n, 8, F]
        return codes.reshape(n, channels * CODEBOOKS_PER_SPEAKER, -1).cpu().numpy()
