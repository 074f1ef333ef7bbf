"""The PyTorch (moshi) safetensors export of a model: which tensors, from where, streamed to disk.

Either the full model with LoRA merged (`consolidated.safetensors`, config.json says
`"lora": false`) or the adapters only (`lora.safetensors`: LoRA A/B + every TTT tensor, config.json
with the lora keys). Tensors stream one at a time from their source (an Orbax checkpoint read
layer by layer, PyTorch base weights, or a live sharded model gathered slice by slice) into the
file, so the 7B model never sits in host memory; with several processes only process 0 writes.
`python -m conversion.to_pytorch` and the checkpoints' `consolidated/` item both write with it.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from tttjax.errors import UserError
from tttjax.model.config import ModelConfig, parse_dtype, to_config_json
from tttjax.rundir import ADAPTERS_FILE, CONFIG_FILE, EXPORT_FILES, FULL_FILE, write_config_json
from tttjax.weights import layout
from tttjax.weights.safetensors_io import SafetensorsWriter, partial_path
from tttjax.weights.sources import Index, ParamSource, Path_


@dataclasses.dataclass
class Export:
    """One export ready to stream: its file name, config.json, and where every tensor comes from."""

    filename: str
    config: dict
    rows: list[layout.Row]  # sorted by tensor name: the file's order
    source: ParamSource
    dtype: np.dtype  # stored dtype
    param_dtype: np.dtype  # values pass through the model's param dtype, as a loaded model holds them
    lora_scaling: float | None  # fold LoRA into the kernels (full export of a LoRA model), else None

    @property
    def specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {r.name: (r.torch_shape(self.source.specs[r.path][0]), self.dtype) for r in self.rows}

    def _read(self, path: Path_, index: Index) -> np.ndarray:
        value = self.source.read(path, index).astype(self.param_dtype, copy=False)
        lora_a = path[:-1] + ("lora_a",)
        if self.lora_scaling is not None and path[-1] == "kernel" and lora_a in self.source.specs:
            a, b = (self.source.read(p, index).astype(self.param_dtype, copy=False).astype(np.float32)
                    for p in (lora_a, path[:-1] + ("lora_b",)))
            value = value.astype(np.float32) + self.lora_scaling * (a @ b)  # merged in fp32
        return value

    def _torch_value(self, row: layout.Row) -> np.ndarray:
        value = row.to_torch(lambda index: self._read(row.path, index))
        return np.ascontiguousarray(value.astype(self.dtype, copy=False))

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, torch value) in file order; with several processes, every process must iterate.

        One worker thread reads and transposes the next tensor while the caller writes this one
        (both release the GIL); it runs the rows in order, so gathers stay in step across processes.
        """
        with ThreadPoolExecutor(1, thread_name_prefix="export") as worker:
            pending = [worker.submit(self._torch_value, row) for row in self.rows[:1]]
            for i, row in enumerate(self.rows):
                value = pending.pop().result()
                if i + 1 < len(self.rows):
                    pending.append(worker.submit(self._torch_value, self.rows[i + 1]))
                yield row.name, value

    def write(self, out_dir: str | Path, *, writer: bool = True) -> Path:
        """Streams the file and writes config.json into `out_dir` (never over an existing export).

        Every process must call it (reading a sharded model gathers); only those with `writer`
        touch the disk.
        """
        if writer:
            return write_export(out_dir, self.filename, self.config, self.specs, self.tensors())
        for _ in self.tensors():
            pass
        return Path(out_dir) / self.filename


def plan_export(cfg: ModelConfig, source: ParamSource, *, layout_name: str = "moshi", dtype: str = "bfloat16",
                adapters_only: bool = False) -> Export:
    """The export of the model `cfg` whose params `source` holds; reads nothing yet."""
    if adapters_only:
        if cfg.lora_rank == 0 and not cfg.ttt_layers:
            raise UserError("--adapters_only: the model has neither LoRA nor TTT parameters")
        rows = [r for r in layout.rows(cfg, layout_name) if r.group in ("lora", "ttt")]
        config, filename, scaling = to_config_json(cfg), ADAPTERS_FILE, None
    else:
        rows = layout.rows(dataclasses.replace(cfg, lora_rank=0), layout_name)
        config, filename = to_config_json(cfg, lora=False), FULL_FILE
        scaling = cfg.lora_scaling if cfg.lora_rank else None
    missing = sorted({".".join(r.path) for r in rows if r.path not in source.specs})
    if missing:
        raise UserError(f"the checkpoint does not hold {missing}")
    return Export(filename, config, sorted(rows, key=lambda r: r.name), source, np.dtype(parse_dtype(dtype)),
                  np.dtype(cfg.jnp_param_dtype), scaling)


def write_export(out_dir: str | Path, filename: str, config: dict, specs: dict,
                 tensors: Iterable[tuple[str, np.ndarray]]) -> Path:
    """The one export writer: `filename` streamed tensor by tensor in name order (`specs`: {name:
    (shape, dtype)}), then config.json, into a new or empty directory (`check_export_dir`). On any
    failure or interruption (KeyboardInterrupt included) it removes what it wrote, .partial file
    included, and re-raises."""
    out_dir = Path(out_dir)
    check_export_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / filename
    written = (partial_path(target), target, out_dir / CONFIG_FILE)
    try:
        with SafetensorsWriter(target, specs, metadata={"format": "pt"}) as w:
            for name, value in tensors:
                w.write(name, value)
        write_config_json(out_dir, config)
    except BaseException:
        for path in written:  # none of them existed: check_export_dir refuses a directory holding one
            path.unlink(missing_ok=True)
        raise
    return target


def check_export_dir(out_dir: Path) -> None:
    """Refuses an output directory that holds anything but the leftovers of an interrupted export
    (removed here): never an export over an export, never an export among other files. Nothing is
    overwritten, so there is no overwrite flag: an export is cheap to redo into a new directory,
    and `rm -r` of an old one is the user's explicit choice."""
    if not out_dir.is_dir():
        return
    leftovers = {partial_path(out_dir / name).name for name in EXPORT_FILES}
    present = sorted(p.name for p in out_dir.iterdir())
    if any(name in present for name in (*EXPORT_FILES, CONFIG_FILE)):
        raise FileExistsError(f"{out_dir} already holds an export; choose a new --out")
    others = [name for name in present if name not in leftovers]
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise FileExistsError(f"{out_dir} is not empty ({shown}): choose a new or empty --out")
    for name in present:
        (out_dir / name).unlink()
