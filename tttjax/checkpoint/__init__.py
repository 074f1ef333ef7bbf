"""Checkpointing: Orbax step dirs (state, data position, PyTorch export), preemption, compat checks."""

from tttjax.checkpoint.compat import check_compatible
from tttjax.checkpoint.manager import CheckpointManager

__all__ = ["CheckpointManager", "check_compatible"]
