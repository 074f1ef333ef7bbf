"""Checkpointing: Orbax step dirs (state, data position, PyTorch export), preemption, compat checks."""

from tttjax.checkpoint.compat import check_compatible
from tttjax.checkpoint.manager import CheckpointManager, step_dir
from tttjax.checkpoint.params import restore_params

__all__ = ["CheckpointManager", "check_compatible", "restore_params", "step_dir"]
