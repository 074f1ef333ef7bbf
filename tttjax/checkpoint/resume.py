"""The resume policy: which step a run continues from, what it sets aside, what it refuses.

A run's steps live in two tiers: the persistent one (`<run_dir>/checkpoints`, every `ckpt_freq`
steps) and, with `checkpoint.local_dir`, a local one (each process's copies on its own disk, every
`local_ckpt_freq` steps; usable only when every process of a job of the same layout has the step).
Auto-resume tries the steps of both newest first (a step in both: the local copy first); the newest
that restores and passes its checks (digests, structure, finite values) wins, and the ones tried
before it move to their tier's checkpoints.broken/ (they are recomputed). A read that keeps failing
with an I/O error is not damage: a persistent one stops the run with nothing moved
(CheckpointIOError); a local one only drops that copy from the candidates. If every step is damaged,
`checkpoint.if_all_broken` decides: refuse (naming each step and how to start over) or start over
from the starting weights with the steps set aside. An explicit `checkpoint.resume_step` that does
not restore is refused. Steps after the restored one (an earlier resume_step) move to
checkpoints.superseded/, so the new run saves its own. A checkpoint of another architecture, frozen
base or data stream is refused by name (those are not damage), the data stream unless
`checkpoint.allow_data_change`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from tttjax import rundir
from tttjax.checkpoint.compat import check_compatible
from tttjax.checkpoint.manager import BrokenCheckpoint, CheckpointIOError, CheckpointManager
from tttjax.errors import UserError
from tttjax.trees import all_finite, same_fingerprint

# What decides the examples each step trains on and how they are averaged; saved with every step.
DATA_STREAM_KEYS = ("seed", "batch_size", "num_microbatches", "duration_sec", "data.train_data", "data.shuffle")
LOCAL_STEPS_COMPARED = 64  # the newest local steps each process offers when they agree on common ones


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
    state: Any  # the restored train state; None: start from the starting weights (all steps set aside)
    next_step: int  # the first step the run takes
    start_example: int  # the first global example it reads
    notes: list[str]  # what was set aside or accepted, for the log and the console
    tier: str = "persistent"  # where the restored step came from: persistent | local


@dataclasses.dataclass
class RunIdentity:
    """What a run's checkpoints must agree with to be resumed by it."""

    metadata: dict  # architecture and trainable set (`check_compatible`)
    fingerprint: dict  # of the frozen base
    data_stream: dict  # `data_stream(config)`
    layout: dict | None = None  # processes, mesh and devices: a local copy restores only onto the same


def resume(manager: CheckpointManager, checkpoint_config, identity: RunIdentity, abstract_state,
           local: CheckpointManager | None = None) -> Resumed | None:
    """The latest restorable (or the chosen) step of `manager`'s run, or of its `local` tier, restored
    into `abstract_state`'s shardings, or None for a run without checkpoints (or one started over).
    `checkpoint_config` is the run config's `checkpoint` block (resume, resume_step,
    allow_data_change, if_all_broken)."""
    run_dir = manager.run_dir
    tiers = {"persistent": manager, "local": local}
    steps, local_steps = manager.all_steps(), _common_local_steps(local, identity)
    if (steps or local_steps) and checkpoint_config.resume == "never":
        raise ResumeError(f"{run_dir} already has checkpoints {sorted(set(steps + local_steps))}; set "
                          f"checkpoint.resume=auto to continue it or choose a new run_dir")
    if not steps and not local_steps:
        return None
    notes: list[str] = []
    candidates = sorted([(s, "local") for s in local_steps] + [(s, "persistent") for s in steps],
                        key=lambda c: (c[0], c[1] == "local"), reverse=True)
    wanted = checkpoint_config.resume_step
    if wanted != -1:
        candidates = [c for c in candidates if c[0] == wanted] or [(wanted, "persistent")]
    broken: dict[tuple[int, str], BrokenCheckpoint] = {}
    resumed = None
    for step, tier in candidates:
        try:
            resumed = _restore(tiers[tier], step, checkpoint_config, identity, abstract_state, notes)
            resumed.tier = tier
            break
        except BrokenCheckpoint as e:
            broken[(step, tier)] = e
        except CheckpointIOError as e:
            if tier == "persistent":
                raise
            notes.append(f"the local copy of step {step} could not be read ({e}); not using it")
    if resumed is None:
        if wanted != -1:
            raise ResumeError(f"checkpoint.resume_step={wanted}: {broken[candidates[-1]]}") from None
        if checkpoint_config.if_all_broken != "start_over":
            listed = "; ".join(f"{tier} step {s}: {e}" for (s, tier), e in broken.items())
            raise ResumeError(
                f"every checkpoint of {run_dir} is damaged ({listed}); nothing was moved. To start over from the "
                f"starting weights, keeping these steps in {rundir.broken_dir(run_dir).name}/, re-run with "
                f"--config.checkpoint.if_all_broken=start_over (or choose a new run_dir)") from None
    for (bad, tier), error in sorted(broken.items()):
        [moved] = tiers[tier].set_aside([bad], rundir.broken_dir(tiers[tier].run_dir))
        notes.append(f"skipped {'the local copy of ' if tier == 'local' else ''}checkpoint step {bad} ({error}); "
                     f"moved it to {moved}")
    if resumed is None:
        notes.append("every checkpoint was damaged (checkpoint.if_all_broken=start_over): starting over from the "
                     "starting weights")
        return Resumed(None, 0, 0, notes, tier="none")
    _supersede(manager, resumed.next_step, notes, "")
    if local is not None:
        _supersede(local, resumed.next_step, notes, "local ")
    return resumed


def _supersede(manager: CheckpointManager, step: int, notes: list[str], what: str) -> None:
    """Moves `manager`'s steps after `step` aside: the resumed run saves its own."""
    later = [s for s in manager.all_steps() if s > step]
    if later:  # the same on every process (a local tier's processes move their own, without waiting)
        moved = manager.set_aside(later, rundir.superseded_dir(manager.run_dir, step))
        notes.append(f"resuming from step {step}: moved the later {what}steps {later} to {moved[0].parent}; "
                     f"this run saves its own")


def _common_local_steps(local: CheckpointManager | None, identity: RunIdentity) -> list[int]:
    """The local steps every process holds, saved with this job's layout (another layout's copies
    hold other shards)."""
    if local is None:
        return []
    mine = [s for s in local.all_steps() if _saved_layout(local, s) in (None, identity.layout)]
    offered = np.full(LOCAL_STEPS_COMPARED, -1, np.int32)
    newest = sorted(mine)[-LOCAL_STEPS_COMPARED:]
    offered[:len(newest)] = newest
    if jax.process_count() > 1:
        offered = multihost_utils.process_allgather(offered)
    common = set.intersection(*(set(row.tolist()) for row in np.atleast_2d(offered))) - {-1}
    return sorted(common)


def _saved_layout(local: CheckpointManager, step: int) -> dict | None:
    """The layout a local step was saved with; None if its metadata does not read (its restore then
    fails and sets it aside)."""
    try:
        return local.restore_metadata(step, alone=True).get("layout")
    except (BrokenCheckpoint, CheckpointIOError):
        return None


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
