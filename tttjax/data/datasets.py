"""`make_dataset(spec)`: from a data spec string to the weighted sources the pipeline reads."""

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tttjax.data.sources import PreparedSource, TfdsSource, parse_tfds_spec
from tttjax.data.synthetic import SyntheticDataset
from tttjax.errors import UserError

DEFAULT_SYNTHETIC_EXAMPLES = 4096


@dataclass(frozen=True)
class Mixture:
    """Random-access sources with mixing weights; examples are cut or -1-padded to num_frames."""

    components: tuple[tuple[Any, float], ...]
    num_frames: int | None = None

    def __len__(self) -> int:
        return sum(len(src) for src, _ in self.components)


def _weighted_items(spec: str) -> list[tuple[str, float]]:
    """'a:0.7,b:0.3' -> [(a, 0.7), (b, 0.3)]; a trailing ':<float>' is a weight (synthetic:N is a size)."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        head, sep, tail = item.rpartition(":")
        weight = 1.0
        if sep and head and _is_weight(tail) and not (head == "synthetic" and tail.isdigit()):
            item, weight = head, float(tail)
            if not (math.isfinite(weight) and weight > 0):
                raise UserError(f"data spec {spec!r}: weight of {item!r} must be positive")
        if not item:
            raise UserError(f"data spec {spec!r}: empty entry")
        out.append((item, weight))
    names = [name for name, _ in out]
    if len(set(names)) != len(names):
        raise UserError(f"data spec {spec!r}: a source appears twice")
    return out


def _is_weight(text: str) -> bool:
    return re.fullmatch(r"(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text) is not None


def _source(item: str, *, num_frames: int, card: int, text_card: int, n_q: int, seed: int):
    if item == "synthetic" or item.startswith("synthetic:"):
        size = item.partition(":")[2]
        if size and not size.isdigit():
            raise UserError(f"{item}: expected synthetic or synthetic:N")
        n = int(size) if size else DEFAULT_SYNTHETIC_EXAMPLES
        return SyntheticDataset(
            num_examples=n, num_frames=num_frames, card=card, text_card=text_card, n_q=n_q, seed=seed
        )
    if item.startswith("tfds:"):
        return TfdsSource(*parse_tfds_spec(item[len("tfds:"):]))
    if item.endswith(".jsonl"):
        raise UserError(f"{item}: a moshi-finetune jsonl; prepare it first (python -m tttjax.data.prepare "
                         f"--jsonl {item} --out DATA_DIR) and train on DATA_DIR")
    if not Path(item).is_dir():
        raise UserError(
            f"{item}: no such data dir (expected a prepared DATA_DIR, synthetic[:N] or tfds:name[:split])"
        )
    src = PreparedSource(item)
    meta = src.metadata
    if meta["num_streams"] != 1 + n_q:
        raise UserError(f"{item}: {meta['num_streams']} streams, the model has {1 + n_q}")
    if meta["max_audio_id"] >= card or meta["max_text_id"] >= text_card:
        raise UserError(
            f"{item}: ids up to {meta['max_audio_id']} (audio) / {meta['max_text_id']} (text) do not fit "
            f"card {card} / text_card {text_card}"
        )
    return src


def make_dataset(spec: str, *, num_frames: int, card: int, text_card: int, n_q: int, seed: int) -> Mixture:
    """spec: "synthetic", "synthetic:N", a prepared DATA_DIR, "tfds:name[:split]", or "a:0.7,b:0.3".

    `seed` only sets the synthetic data's content; order and segments come from the iterator's seed.
    """
    items = _weighted_items(spec)
    components = tuple(
        (_source(item, num_frames=num_frames, card=card, text_card=text_card, n_q=n_q, seed=seed), w)
        for item, w in items
    )
    return Mixture(components, num_frames)
