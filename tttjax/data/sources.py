"""Random-access sources of [17, T] code arrays: a prepared DATA_DIR, or a TFDS ArrayRecord dataset."""

import os
import re
from pathlib import Path

import grain
import numpy as np

from tttjax.data import shards
from tttjax.data.streams import NUM_STREAMS
from tttjax.errors import UserError
from tttjax.rundir import error_summary


class PreparedSource:
    """The examples of a DATA_DIR written by tttjax.data.prepare, in shard order."""

    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir)
        self.metadata = shards.read_metadata(self.data_dir)
        used = [s for s in self.metadata["shards"] if s["num_examples"]]
        if not used:
            raise UserError(f"{self.data_dir}: prepared data dir holds no examples")
        self._files = [self.data_dir / s["file"] for s in used]
        self._starts = np.cumsum([0] + [s["num_examples"] for s in used])
        try:
            self._records = grain.sources.ArrayRecordDataSource([str(f) for f in self._files])  # picklable
        except Exception as e:  # Riegeli raises RuntimeError for a damaged shard index
            raise UserError(f"{self.data_dir}: a shard does not open ({error_summary(e)}); find it with "
                             f"python -m tttjax.data.prepare --verify {self.data_dir}") from None

    @property
    def cut_frames(self) -> int | None:
        """The length prepare cut the inputs to (--duration_sec); None: whole files (--duration_sec 0)."""
        return self.metadata["max_frames_per_example"] if self.metadata["duration_sec"] else None

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> np.ndarray:
        try:
            return shards.decode_example(self._records[index])
        except Exception as e:  # Riegeli / numpy raise many types for a damaged shard
            k = int(np.searchsorted(self._starts, index, side="right")) - 1
            raise UserError(f"{self._files[k]}: record {index - int(self._starts[k])} is unreadable "
                             f"({error_summary(e)}); check every shard with python -m tttjax.data.prepare "
                             f"--verify {self.data_dir}") from None

    def __repr__(self) -> str:
        return f"PreparedSource({str(self.data_dir)!r})"


def parse_tfds_spec(rest: str) -> tuple[str, str]:
    """'name[/config][:x.y.z][:split]' -> (name with version, split; default 'train')."""
    fields = re.split(r":(?![^\[]*\])", rest)  # split slices like train[:90%] stay whole
    name = fields.pop(0)
    if fields and re.fullmatch(r"\d+\.\d+\.\d+", fields[0]):
        name += ":" + fields.pop(0)
    if len(fields) > 1 or not name:
        raise UserError(f"tfds:{rest}: expected tfds:name[:version][:split]")
    return name, fields[0] if fields else "train"


class TfdsSource:
    """A TFDS dataset in ArrayRecord format, read by `tfds.data_source` (random access, no TensorFlow).

    Each example must have a feature "codes": an integer tensor [17, T] (text, Moshi's 8 codebooks,
    the user's 8; -1 = no token).
    """

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None):
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise UserError(
                f"tfds:{name}: needs tensorflow-datasets (pip install tensorflow-datasets; not TensorFlow)"
            ) from None
        self.name, self.split = name, split
        data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")  # read now: tfds reads it once, at import
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises many types for a missing or non-ArrayRecord dataset
            where = data_dir or "~/tensorflow_datasets (set TFDS_DATA_DIR)"
            raise UserError(f"tfds:{name}:{split}: cannot open it as an ArrayRecord data source in {where} "
                             f"({type(e).__name__}: {str(e).strip().splitlines()[0]})") from None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> np.ndarray:
        example = self._source[index]
        if not isinstance(example, dict) or "codes" not in example:
            features = sorted(example) if isinstance(example, dict) else type(example).__name__
            raise UserError(f"tfds:{self.name}:{self.split}: no 'codes' feature (got {features})")
        codes = np.asarray(example["codes"])
        if codes.ndim != 2 or codes.shape[0] != NUM_STREAMS:
            where = f"tfds:{self.name}:{self.split}[{index}]"
            raise UserError(f"{where}: codes of shape {codes.shape}, expected [{NUM_STREAMS}, T]")
        return codes

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {self.split!r})"
