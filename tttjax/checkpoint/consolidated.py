"""The `consolidated/` item: the PyTorch-layout export written inside an Orbax step.

It is an Orbax handler (not a side file) so that the export is part of the step's atomic
commit: a step whose safetensors file was not fully written is never finalized.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import future

from conversion import safetensors_io
from conversion.to_pytorch import CONFIG_FILE, EXPORT_FILES, write_config



def _write(directory: Path, args: ConsolidatedSave) -> None:
    """Writes the safetensors file (keys sorted, torch format tag) and config.json."""
    safetensors_io.save(directory / args.filename, args.tensors, metadata={"format": "pt"})
    write_config(directory, args.config)


def _owned(args: ConsolidatedSave) -> ConsolidatedSave:
    """Copies jax arrays to host now: they may alias buffers that a donated train step reuses."""
    tensors = {k: np.array(v) if isinstance(v, jax.Array) else v for k, v in args.tensors.items()}
    return dataclasses.replace(args, tensors=tensors)


class ConsolidatedHandler(ocp.AsyncCheckpointHandler):
    """Writes a `ConsolidatedSave` in the background, on process 0 only."""

    async def async_save(self, directory, args: ConsolidatedSave) -> list[future.Future]:
        args = _owned(args)

        async def write() -> None:
            if jax.process_index() == 0:
                _write(Path(directory), args)

        return [future.CommitFutureAwaitingContractedSignals(write(), name="consolidated_save")]

    def save(self, directory, args: ConsolidatedSave) -> None:
        args = _owned(args)
        if jax.process_index() == 0:
            _write(Path(directory), args)

    def restore(self, directory, args: ConsolidatedRestore | None = None):
        """Returns (tensors, config, filename)."""
        directory = Path(directory)
        names = [n for n in EXPORT_FILES if (directory / n).exists()]
        if len(names) != 1:
            raise FileNotFoundError(f"{directory}: expected one of {EXPORT_FILES}, found {names}")
        tensors = safetensors_io.load(directory / names[0])
        return tensors, json.loads((directory / CONFIG_FILE).read_text()), names[0]


@ocp.args.register_with_handler(ConsolidatedHandler, for_save=True)
@dataclasses.dataclass
class ConsolidatedSave(ocp.args.CheckpointArgs):
    """Named host tensors (numpy; written after `save` returns, so do not mutate them), the
    config.json dict, and the safetensors file name (one of EXPORT_FILES)."""

    tensors: dict[str, np.ndarray]
    config: dict
    filename: str

    def __post_init__(self):
        if self.filename not in EXPORT_FILES:
            raise ValueError(f"consolidated filename {self.filename!r} is not one of {EXPORT_FILES}")


@ocp.args.register_with_handler(ConsolidatedHandler, for_restore=True)
@dataclasses.dataclass
class ConsolidatedRestore(ocp.args.CheckpointArgs):
    """Restores (tensors, config, filename)."""
