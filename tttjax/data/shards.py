"""The on-disk format of a prepared DATA_DIR: ArrayRecord shards of [17, T] code arrays + metadata.json.

Each record is one example stored as .npy bytes (self-describing shape and dtype), written with
group_size 1 so that random access reads one record. Files are written to a temporary name and
renamed, so a crash never leaves a complete-looking corrupt file.
"""

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from tttjax.errors import UserError

METADATA = "metadata.json"
FORMAT = "tttjax-codes-v1"


def shard_name(index: int, count: int) -> str:
    return f"codes-{index:05d}-of-{count:05d}.array_record"


def encode_example(codes: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, codes, allow_pickle=False)
    return buf.getvalue()


def decode_example(record: bytes) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(record), allow_pickle=False)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(path: Path, examples: Iterable[np.ndarray]) -> dict:
    """Writes the examples atomically; returns {file, num_examples, num_bytes, sha256}."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = path.with_name(path.name + ".tmp")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    count = 0
    for codes in examples:
        writer.write(encode_example(codes))
        count += 1
    writer.close()
    os.replace(tmp, path)
    return {
        "file": path.name,
        "num_examples": count,
        "num_bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def read_metadata(data_dir: Path) -> dict:
    """metadata.json of a prepared dir, after checking that its shards are there with their sizes."""
    path = Path(data_dir) / METADATA
    if not path.is_file():
        raise UserError(f"{data_dir}: not a prepared data dir (no {METADATA}); run tttjax.data.prepare")
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: unreadable metadata ({e})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    for shard in meta["shards"]:
        file = Path(data_dir) / shard["file"]
        if not file.is_file() or file.stat().st_size != shard["num_bytes"]:
            raise UserError(f"{file}: missing or truncated shard (expected {shard['num_bytes']} bytes)")
    return meta


def verify_shards(data_dir: Path) -> list[str]:
    """One line per shard of a prepared dir whose sha256 differs from metadata.json's (empty: all good).

    `read_metadata` (run at every training start) checks presence and sizes only; hashing every
    shard is this explicit check's job."""
    meta = read_metadata(data_dir)
    return [f"{Path(data_dir) / shard['file']}: sha256 differs from {METADATA} (the shard is corrupt)"
            for shard in meta["shards"] if sha256_file(Path(data_dir) / shard["file"]) != shard["sha256"]]
