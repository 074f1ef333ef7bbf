"""Checkpointing: Orbax step dirs (state, data position, PyTorch export), preemption, compat checks."""

from tttjax.checkpoint.compat import check_compatible
from tttjax.checkpoint.lock import RunDirError
from tttjax.checkpoint.manager import (
    BrokenCheckpoint,
    CheckpointError,
    CheckpointManager,
)

__all__ = ["BrokenCheckpoint", "CheckpointError", "CheckpointManager", "RunDirError", "check_compatible"]
