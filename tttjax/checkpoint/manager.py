"""Orbax CheckpointManager wrapper: one atomic step dir with `state/`, `data/`, `consolidated/`.

Naming, cadence, retention and preemption follow the run-directory contract (DESIGN.md §6);
everything else is Orbax's (async writes, tmp dir + rename commit, sharded restore).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from tttjax.checkpoint.consolidated import ConsolidatedHandler, ConsolidatedSave
from tttjax.rundir import CONSOLIDATED, DATA, DATA_FILE, STATE, STEP_DIGITS, STEP_PREFIX, checkpoints_dir

log = logging.getLogger(__name__)

# Orbax's default (20 min) is too short for a 7B train state on a slow filesystem; MaxText/Levanter use 30-60.
ASYNC_TIMEOUT_S = 3600


def _remove_uncommitted(directory: Path) -> None:
    """Deletes tmp step dirs left by a save that was killed; Orbax's own cleanup runs lazily."""
    if jax.process_index() == 0:
        for tmp in ocp.path.step.all_temporary_paths(directory):
            log.warning("removing uncommitted checkpoint %s", tmp.get())
            shutil.rmtree(tmp.get())
    ocp.multihost.sync_global_processes("tttjax_checkpoint_cleanup")


def storage_save_args(tree):
    """Orbax SaveArgs that store each trailing 2-D matrix of a stacked array (one layer, one
    depformer step) as its own chunk, so that conversion reads a layer without the rest."""
    return jax.tree.map(lambda x: ocp.SaveArgs(shard_axes=tuple(range(max(np.ndim(x) - 2, 0)))), tree)


class _OrbaxManager(ocp.CheckpointManager):
    """Orbax's manager, but JAX's preemption sync point is only polled with the loop's step.

    JAX takes the step of each `reached_preemption_sync_point` call as this process's position.
    Orbax's save-finalize thread also asks it with the step it just saved
    (`CheckpointManager._finalize_checkpoint`); if that stale step is the one sent when the sync
    point is agreed, the point lies in the past, is never reached, and the job dies unsaved
    (a plain Orbax manager missed it in 6 of 13 single-process SIGTERM runs on a loaded 2-core
    CPU; 0 of 13 with this). Older steps now answer False without asking JAX.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._poll_lock = threading.Lock()
        self._polled: tuple[int, bool] | None = None  # (latest step asked, its answer)

    def reached_preemption(self, step: int) -> bool:
        with self._poll_lock:
            if self._polled is None or step > self._polled[0]:
                self._polled = (step, super().reached_preemption(step))
            return self._polled == (step, True)


class CheckpointManager:
    """Saves and restores train steps under `<run_dir>/checkpoints`.

    `metadata` (a JSON-able architecture description) is stored with every step and read back
    by `restore_metadata`, so a resume can be refused with `check_compatible`. `on_commit` is
    called (in Orbax's background thread) after each async save is committed.
    """

    def __init__(
        self,
        run_dir,
        *,
        max_to_keep: int | None,
        save_interval_steps: int,
        enable_async: bool = True,
        metadata: dict | None = None,
        on_commit: Callable[[], None] | None = None,
    ):
        if save_interval_steps < 0:
            raise ValueError(f"ckpt_freq must be >= 0 (0 = only at the end), got {save_interval_steps}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"num_ckpt_keep must be >= 1 or None (keep all), got {max_to_keep}")
        self.directory = checkpoints_dir(run_dir)
        self._interval = save_interval_steps
        self._metadata = json.loads(json.dumps(metadata or {}))  # fail now, not in a background thread
        _remove_uncommitted(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            step_prefix=STEP_PREFIX,
            step_format_fixed_length=STEP_DIGITS,
            enable_async_checkpointing=enable_async,
            async_options=ocp.AsyncOptions(timeout_secs=ASYNC_TIMEOUT_S, post_finalization_callback=on_commit),
        )
        handlers = {
            STATE: ocp.StandardCheckpointHandler(),
            DATA: ocp.JsonCheckpointHandler(filename=DATA_FILE),
            CONSOLIDATED: ConsolidatedHandler(),
        }
        self._mngr = _OrbaxManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """True at the step all processes agreed to save at after a SIGTERM.

        Call it every step, with increasing steps, on every process; it needs jax.distributed.
        """
        return self._mngr.reached_preemption(step)

    def should_save(self, step: int) -> bool:
        """Every `save_interval_steps` (never when 0) or at the preemption sync step; not if it exists."""
        if step in self._mngr.all_steps():
            return False
        return bool(self._interval and step % self._interval == 0) or self.reached_preemption(step)

    def save(
        self,
        step: int,
        state,
        data_position: dict,
        consolidated: tuple[dict[str, np.ndarray], dict, str] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Starts an async save of `step`; returns whether one was started.

        `consolidated` is (tensors, config_json, filename). An existing step is never
        overwritten: the save is skipped with a warning. All processes must pass the same items.
        """
        if step in self._mngr.all_steps():
            log.warning("checkpoint step %d already exists in %s; not overwriting it", step, self.directory)
            return False
        if not force and not self.should_save(step):
            return False
        try:  # the JSON item is written in the background: fail here, with the step, instead
            json.dumps(data_position)
        except TypeError as e:
            raise TypeError(f"data_position of step {step} is not JSON-able: {e}") from None
        items = {STATE: ocp.args.StandardSave(state, save_args=storage_save_args(state)),
                 DATA: ocp.args.JsonSave(data_position)}
        if consolidated is not None:
            items[CONSOLIDATED] = ConsolidatedSave(*consolidated)
        return self._mngr.save(
            step, args=ocp.args.Composite(**items), custom_metadata=self._metadata, force=True
        )

    def _resolve(self, step: int | None) -> int:
        """None or -1 -> the latest committed step; otherwise the step, which must exist."""
        steps = self.all_steps()
        if step is None or step == -1:
            if not steps:
                raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"no committed checkpoint for step {step} in {self.directory} (have {steps})"
            )
        return step

    def restore(self, step: int | None, abstract_state=None, *, data: bool = True):
        """Returns (state, data_position) of `step` (None/-1 = latest).

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct(..., sharding=...)`: arrays come
        back with those shardings, whatever mesh saved them. Pass None to skip the state, or
        `data=False` to skip the data position; the skipped one comes back as None.
        """
        step = self._resolve(step)
        items = {}
        if abstract_state is not None:
            items[STATE] = ocp.args.StandardRestore(abstract_state)
        if data:
            items[DATA] = ocp.args.JsonRestore()
        if not items:
            raise ValueError("restore: nothing requested (abstract_state is None and data=False)")
        out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        return (out[STATE] if STATE in items else None), (out[DATA] if data else None)

    def restore_metadata(self, step: int | None) -> dict:
        """The metadata dict saved with `step` (None/-1 = latest)."""
        return dict(self._mngr.metadata(self._resolve(step)).custom_metadata or {})

    def wait_until_finished(self) -> None:
        """Blocks until the in-flight save is committed; re-raises its error if it failed."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Waits for the in-flight save, then releases Orbax's threads."""
        self._mngr.close()


def restore_trainables(step: Path, abstract_params):
    """The trained params (fp32 masters, `state["params"]`) of a step dir, onto the shardings of
    `abstract_params`, exactly as saved (checkpoint.init_state_dir: weights only)."""
    target = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(Path(step) / STATE, args=args)["params"]
