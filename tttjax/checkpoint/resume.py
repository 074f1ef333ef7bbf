"""The resume policy: which step a run continues from, what it sets aside, what it refuses.

Auto-resume tries the committed steps newest first; the ones newer than the first that restores
move to checkpoints.broken/ (they are recomputed); if none restores, nothing moves and the resume
is refused. An explicit `checkpoint.resume_step` that does not restore is refused. Steps after
the restored one (an earlier resume_step) move to checkpoints.superseded/, so the new run saves
its own. A checkpoint of another architecture, frozen base or data stream is refused by name
(those are not damage), the data stream unless `checkpoint.allow_data_change`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from tttjax import rundir
from tttjax.checkpoint.compat import check_compatible
from tttjax.checkpoint.manager import BrokenCheckpoint, CheckpointManager
from tttjax.errors import UserError
from tttjax.trees import all_finite, same_fingerprint

# What decides the examples each step trains on and how they are averaged; saved with every step.
DATA_STREAM_KEYS = ("seed", "batch_size", "num_microbatches", "duration_sec", "data.train_data", "data.shuffle")


class ResumeError(UserError):
    """A run dir this config cannot continue (changed model, base or data; nothing restores)."""


def data_stream(config) -> dict:
    """{key: value} of DATA_STREAM_KEYS in `config`."""
    out = {}
    for key in DATA_STREAM_KEYS:
        value = config
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out


@dataclasses.dataclass
class Resumed:
    state: Any  # the restored train state
    next_step: int  # the first step the run takes
    start_example: int  # the first global example it reads
    notes: list[str]  # what was set aside or accepted, for the log and the console


@dataclasses.dataclass
class RunIdentity:
    """What a run's checkpoints must agree with to be resumed by it."""

    metadata: dict  # architecture and trainable set (`check_compatible`)
    fingerprint: dict  # of the frozen base
    data_stream: dict  # `data_stream(config)`


def resume(manager: CheckpointManager, checkpoint_config, identity: RunIdentity, abstract_state) -> Resumed | None:
    """The latest restorable (or the chosen) step of `manager`'s run restored into `abstract_state`'s
    shardings, or None for a run without checkpoints. `checkpoint_config` is the run config's
    `checkpoint` block (resume, resume_step, allow_data_change)."""
    run_dir = manager.run_dir
    steps = manager.all_steps()
    if steps and checkpoint_config.resume == "never":
        raise ResumeError(f"{run_dir} already has checkpoints {steps}; set checkpoint.resume=auto to continue it "
                          f"or choose a new run_dir")
    if not steps:
        return None
    notes: list[str] = []
    wanted = checkpoint_config.resume_step
    if wanted != -1:
        try:
            step, resumed = wanted, _restore(manager, wanted, checkpoint_config, identity, abstract_state, notes)
        except BrokenCheckpoint as e:
            raise ResumeError(f"checkpoint.resume_step={wanted}: {e}") from None
    else:
        broken = {}
        for step in reversed(steps):
            try:
                resumed = _restore(manager, step, checkpoint_config, identity, abstract_state, notes)
                break
            except BrokenCheckpoint as e:
                broken[step] = e
        else:  # nothing moves: a config that no step fits must not look like damage to all of them
            raise ResumeError(f"no checkpoint of {run_dir} restores (newest: {broken[steps[-1]]}); nothing was "
                              f"moved") from None
        for bad, error in sorted(broken.items()):
            [moved] = manager.set_aside([bad], rundir.broken_dir(run_dir))
            notes.append(f"skipped checkpoint step {bad} ({error}); moved it to {moved}")
    later = [s for s in manager.all_steps() if s > step]
    if later:
        moved = manager.set_aside(later, rundir.superseded_dir(run_dir, step))
        notes.append(f"resuming from step {step}: moved the later steps {later} to {moved[0].parent}; this run "
                     f"saves its own")
    return resumed


def _restore(manager, step: int, checkpoint_config, identity: RunIdentity, abstract_state, notes) -> Resumed:
    """`step` restored; BrokenCheckpoint if it does not restore completely (unreadable, non-finite)."""
    run_dir = manager.run_dir
    saved = manager.restore_metadata(step)
    check_compatible({k: saved.get(k) for k in identity.metadata}, identity.metadata,
                     source=f"checkpoint in {run_dir}")
    if not same_fingerprint(saved["frozen_fingerprint"], identity.fingerprint):
        raise ResumeError(f"the frozen base weights differ from those checkpoint {run_dir} was trained on "
                          f"(moshi_paths / seed changed?)")
    saved_stream = saved.get("data_stream") or identity.data_stream  # older checkpoints did not record it
    try:
        check_compatible(saved_stream, identity.data_stream, source=f"the data stream of checkpoint step {step}")
    except UserError as e:
        if not checkpoint_config.allow_data_change:
            raise ResumeError(f"{e}; set checkpoint.allow_data_change=true to resume with the new one") from None
        notes.append(f"{e}; accepted (checkpoint.allow_data_change): the run continues after the examples it has "
                     f"seen")
    state, position = manager.restore(step, abstract_state)
    if not bool(jax.jit(all_finite)(state)):  # one program: eager ops over a sharded state are one each
        raise BrokenCheckpoint(f"{rundir.step_dir(run_dir, step)} holds non-finite values")
    start_example = int(position.get("next_example", position["next_step"] * saved_stream["batch_size"]))
    return Resumed(state, int(position["next_step"]), start_example, notes)
