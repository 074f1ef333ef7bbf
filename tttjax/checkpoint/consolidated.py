"""The `consolidated/` item: the PyTorch-layout export written inside an Orbax step.

It is an Orbax handler (not a side file) so that the export is part of the step's atomic
commit: a step whose safetensors file was not fully written is never finalized. The file is
written by the one export writer (`tttjax.weights.export.write_export`) from tensors gathered when
the save starts (`Export.tensors()`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import future

from tttjax.rundir import EXPORT_FILES
from tttjax.weights.export import write_export


def _write(directory: Path, args: ConsolidatedSave) -> None:
    specs = {name: (value.shape, value.dtype) for name, value in args.tensors.items()}
    write_export(directory, args.filename, args.config, specs, sorted(args.tensors.items()))


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

    def restore(self, directory, args=None):
        """Orbax requires it; nothing restores this item (an export is read as PyTorch weights)."""
        raise NotImplementedError(f"{directory}: the consolidated/ export is not restored; open it as PyTorch weights")


# Orbax finds a handler through args registered for saving and restoring; nothing restores this item.
@ocp.args.register_with_handler(ConsolidatedHandler, for_save=True, for_restore=True)
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
