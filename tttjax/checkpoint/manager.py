"""Orbax CheckpointManager wrapper: one atomic step dir with `state/`, `data/`, `digests/`, `consolidated/`.

Naming, cadence, retention and preemption follow the run-directory contract (docs/contract.md §6, §10);
everything else is Orbax's (async writes, tmp dir + rename commit, sharded restore). The
uncommitted tmp dirs of a killed save are removed only under the run_dir's lock (`lock.py`), so a
manager opened beside a live run never deletes its in-flight save. Every save records the digests
of its arrays (`digests.py`) and a restore checks them. Failures come out as one line naming the
step and the file: `BrokenCheckpoint` (a step that reads but fails its checks: digests, structure,
decompression), `CheckpointIOError` (a read that kept failing with an I/O error, after retries:
nothing about the step is known), `CheckpointError` (a save that failed).

A `local` manager keeps one process's copies on that host's disk (checkpoint.local_dir): every
process writes all the shards it holds into its own directory and commits it alone (Orbax's
per-process mode, primary_host=None), and restores only onto the same processes and mesh.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import type_handlers

from tttjax.checkpoint import digests, lock
from tttjax.checkpoint.consolidated import ConsolidatedHandler, ConsolidatedSave
from tttjax.errors import UserError
from tttjax.rundir import (
    CONSOLIDATED,
    DATA,
    DATA_FILE,
    DIGESTS,
    STATE,
    STEP_DIGITS,
    STEP_PREFIX,
    checkpoints_dir,
    error_summary,
    step_dir,
    unused_name,
)

log = logging.getLogger(__name__)

# Orbax's default (20 min) is too short for a 7B train state on a slow filesystem; MaxText/Levanter use 30-60.
ASYNC_TIMEOUT_S = 3600


class CheckpointError(UserError):
    """A save that failed (disk full, unwritable): the message names the step, the file and the errno."""


class BrokenCheckpoint(CheckpointError):
    """A committed step that reads but fails its checks; the message names the step dir and what is broken."""


class CheckpointIOError(CheckpointError):
    """A step that could not be read (an I/O error, after retries); nothing about it was decided or moved."""


# errnos of a read that may succeed later or elsewhere (a flaky network filesystem, a lost mount,
# permissions): never evidence that the step itself is damaged
IO_ERRNOS = frozenset(getattr(errno, name) for name in (
    "EIO", "ETIMEDOUT", "EACCES", "EPERM", "ESTALE", "ENOTCONN", "ECONNRESET", "ECONNREFUSED", "ECONNABORTED",
    "EHOSTUNREACH", "EHOSTDOWN", "ENETDOWN", "ENETUNREACH", "ENETRESET", "EAGAIN", "EBUSY", "EINTR", "ENODEV",
    "ENXIO", "ENOLINK", "EREMOTEIO", "ENOMEDIUM", "ECOMM") if hasattr(errno, name))
# the status codes TensorStore and Orbax report for the same (absl::Status names)
IO_STATUS = ("UNAVAILABLE:", "DEADLINE_EXCEEDED:", "PERMISSION_DENIED:", "UNAUTHENTICATED:")


def is_io_error(error: BaseException, step: Path) -> bool:
    """Whether a failed read of `step` is the storage's fault rather than the step's: an errno or a
    status of IO_ERRNOS / IO_STATUS anywhere in the chain, a timeout, or the step dir itself gone
    (a lost mount; a file missing inside a present step dir is damage)."""
    seen = error
    while seen is not None:
        if isinstance(seen, (TimeoutError, ConnectionError)):
            return True
        if isinstance(seen, OSError) and seen.errno in IO_ERRNOS:
            return True
        text = str(seen)
        if any(code in text for code in IO_STATUS):
            return True
        if any(int(n) in IO_ERRNOS for n in re.findall(r"(?:OS error|Errno) (\d+)", text)):
            return True
        seen = seen.__cause__ or seen.__context__
    return not Path(step).is_dir()


def _agreed(problem: int) -> int:
    """The worst of every process's `problem` code (0 fine, 1 an I/O error, 2 damage): all
    processes take the same branch after a read."""
    if jax.process_count() == 1:
        return problem
    return int(np.max(multihost_utils.process_allgather(np.int32(problem))))


def _remove_uncommitted(run_dir, local: bool) -> None:
    """Deletes tmp step dirs left by a save that was killed, if the run_dir's lock is free or ours
    (a live writer's tmp dir is its save in flight); Orbax's own cleanup runs lazily. A local
    tier's directory is its process's own (the run's lock covers it)."""
    if local:
        for tmp in ocp.path.step.all_temporary_paths(checkpoints_dir(run_dir)):
            log.warning("removing uncommitted local checkpoint %s", tmp.get())
            _remove_tree(tmp.get())
        return
    if jax.process_index() == 0:
        with lock.holding(run_dir) as held:
            for tmp in ocp.path.step.all_temporary_paths(checkpoints_dir(run_dir)) if held else ():
                log.warning("removing uncommitted checkpoint %s", tmp.get())
                _remove_tree(tmp.get())
    ocp.multihost.sync_global_processes("tttjax_checkpoint_cleanup")


def _remove_tree(path, attempts: int = 5) -> None:
    """shutil.rmtree, retried: after a failed save in this process, Orbax's writer threads of its
    other items may still be finishing files in the tmp dir ("Directory not empty")."""
    for attempt in range(attempts):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


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


def _local_handlers() -> tuple[ocp.options.MultiprocessingOptions, dict]:
    """Orbax's per-process mode: this process alone writes and commits its directory, with every
    shard it holds (replicas too: no other process writes them there)."""
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=None, active_processes={me},
                                                 barrier_sync_key_prefix=f"tttjax_local_{me}")
    registry = type_handlers.create_type_handler_registry(
        (jax.Array, type_handlers.ArrayHandler(primary_host=None, replica_id=None, use_replica_parallel=False)))
    handlers = {
        STATE: ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True, multiprocessing_options=options,
                                           type_handler_registry=registry),
        DATA: ocp.JsonCheckpointHandler(filename=DATA_FILE, multiprocessing_options=options),
        DIGESTS: digests.DigestsHandler(),
    }
    return options, handlers


class CheckpointManager:
    """Saves and restores train steps under `<run_dir>/checkpoints`.

    `metadata` (a JSON-able description of the architecture and the data stream) is stored with
    every step and read back by `restore_metadata`, so a resume can be refused with
    `check_compatible`; it may be replaced before the first save. `on_commit` is called (in
    Orbax's background thread) after each async save is committed. A read that fails with an I/O
    error is tried `read_attempts` times, waiting `retry_wait_s` (doubling) in between. `local`:
    this process's local tier (module docstring); `run_dir` is then its `rundir.local_root`.
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
        local: bool = False,
        read_attempts: int = 4,
        retry_wait_s: float = 2.0,
    ):
        self.run_dir = run_dir
        self.directory = checkpoints_dir(run_dir)
        self.local = local
        self._interval = save_interval_steps
        self.metadata = metadata or {}
        self.read_attempts, self.retry_wait_s = read_attempts, retry_wait_s
        self._saving: int | None = None  # the step of the last save started
        _remove_uncommitted(run_dir, local)
        options = dict(
            max_to_keep=max_to_keep,
            step_prefix=STEP_PREFIX,
            step_format_fixed_length=STEP_DIGITS,
            enable_async_checkpointing=enable_async,
            # Orbax refuses a finalization callback without async saving: a sync save has committed
            # when save() returns, and the caller knows it
            async_options=ocp.AsyncOptions(timeout_secs=ASYNC_TIMEOUT_S,
                                           post_finalization_callback=on_commit if enable_async else None),
        )
        if local:
            self.directory.mkdir(parents=True, exist_ok=True)  # Orbax creates no root in per-process mode
            multiprocessing, handlers = _local_handlers()
            options.update(multiprocessing_options=multiprocessing, enable_per_process_directory_creation=True,
                           create=False)
        else:
            handlers = {
                STATE: ocp.StandardCheckpointHandler(),
                DATA: ocp.JsonCheckpointHandler(filename=DATA_FILE),
                DIGESTS: digests.DigestsHandler(),
                CONSOLIDATED: ConsolidatedHandler(),
            }
        self._mngr = _OrbaxManager(self.directory, options=ocp.CheckpointManagerOptions(**options),
                                   item_handlers=handlers)

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
        try:  # the JSON items are written in the background: fail here, with the step, instead
            json.dumps(data_position)
        except TypeError as e:
            raise TypeError(f"data_position of step {step} is not JSON-able: {e}") from None
        metadata = json.loads(json.dumps(self.metadata))
        save_state = ocp.args.PyTreeSave if self.local else ocp.args.StandardSave
        items = {STATE: save_state(state, save_args=storage_save_args(state)),
                 DATA: ocp.args.JsonSave(data_position),
                 DIGESTS: digests.DigestsSave(digests.start(state))}
        if consolidated is not None:
            if self.local:
                raise ValueError("a local checkpoint holds no consolidated/ export")
            items[CONSOLIDATED] = ConsolidatedSave(*consolidated)
        with self._save_errors():  # the previous async save's failure, under its own step
            self._mngr.wait_until_finished()
        self._saving = step
        with self._save_errors():
            return self._mngr.save(step, args=ocp.args.Composite(**items), custom_metadata=metadata, force=True)

    @contextlib.contextmanager
    def _save_errors(self):
        """An error of the save in flight as one line: step, file, errno; the committed steps are intact."""
        try:
            yield
        except Exception as e:  # Orbax re-raises a background write's error of any type
            raise CheckpointError(f"saving checkpoint step {self._saving} in {self.directory} failed: "
                                  f"{error_summary(e)} (the committed steps {self.all_steps()} are intact)") from e

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
        back with those shardings, whatever mesh saved them, checked against the step's digests
        (a step saved before digests existed is not checked). Pass None to skip the state, or
        `data=False` to skip the data position; the skipped one comes back as None.
        """
        step = self._resolve(step)
        items = {}
        check = abstract_state is not None and (step_dir(self.run_dir, step) / DIGESTS).is_dir()
        if abstract_state is not None:
            items[STATE] = (ocp.args.PyTreeRestore(abstract_state, ocp.checkpoint_utils.construct_restore_args(
                abstract_state)) if self.local else ocp.args.StandardRestore(abstract_state))
        if check:
            items[DIGESTS] = digests.DigestsRestore()
        if data:
            items[DATA] = ocp.args.JsonRestore()
        if not items:
            raise ValueError("restore: nothing requested (abstract_state is None and data=False)")
        out = self._read(step, lambda: self._mngr.restore(step, args=ocp.args.Composite(**items)))
        if check:
            self._check_digests(step, out[STATE], out[DIGESTS])
        return (out[STATE] if STATE in items else None), (out[DATA] if data else None)

    def restore_metadata(self, step: int | None, *, alone: bool = False) -> dict:
        """The metadata dict saved with `step` (None/-1 = latest). `alone`: this process reads on its
        own (a local tier's processes may hold different steps), without agreeing with the others."""
        step = self._resolve(step)
        return self._read(step, lambda: dict(self._mngr.metadata(step).custom_metadata or {}), alone=alone)

    def _read(self, step: int, read: Callable, *, alone: bool = False):
        """`read()`, retried with backoff while it fails with an I/O error (`is_io_error`); then
        CheckpointIOError. Any other failure is damage: BrokenCheckpoint. Every process agrees
        (unless `alone`)."""
        where, wait, started = step_dir(self.run_dir, step), self.retry_wait_s, time.monotonic()
        for attempt in range(1, self.read_attempts + 1):
            error = None
            try:
                out = read()
            except Exception as e:  # Orbax and TensorStore raise many types for a damaged step
                error = e
            problem = 0 if error is None else 1 if is_io_error(error, where) else 2
            problem = problem if alone else _agreed(problem)
            what = error_summary(error) if error is not None else "another process could not read it"
            if problem == 0:
                return out
            if problem == 2:
                raise BrokenCheckpoint(f"{where} does not restore: {what}") from error
            if attempt == self.read_attempts:
                raise CheckpointIOError(
                    f"reading checkpoint step {step} ({where}) failed with an I/O error {attempt} times in "
                    f"{time.monotonic() - started:.0f} s: {what}; nothing was moved or changed: check the "
                    f"storage, then re-run the same command") from error
            log.warning("reading checkpoint step %d failed (%s); retrying in %.1f s", step, what, wait)
            time.sleep(wait)
            wait *= 2
            self._mngr.reload()

    def _check_digests(self, step: int, state, saved: dict) -> None:
        """BrokenCheckpoint naming the arrays (and shards) whose restored values differ from the digests
        the step recorded; every process checks its own shards and the arrays' totals."""
        restored = digests.computed(state)
        totals = None
        if not self.local:  # a local copy records exactly this process's shards: compared one by one
            lanes = digests.local_totals(restored)
            if jax.process_count() > 1:
                lanes = np.sum(multihost_utils.process_allgather(lanes).astype(np.uint64), axis=0) & digests.MASK
            totals = {n: tuple(int(v) for v in t) for n, t in zip(restored, lanes)}
        problems = digests.mismatches(saved, restored, totals)
        if _agreed(2 if problems else 0):
            more = f" (and {len(problems) - 1} more arrays)" if len(problems) > 1 else ""
            detail = problems[0] if problems else "the shards of another process differ"
            raise BrokenCheckpoint(f"{step_dir(self.run_dir, step)} does not match its digests: {detail}{more}")

    def set_aside(self, steps: list[int], target: Path) -> list[Path]:
        """Moves committed `steps` into `target` (never overwriting), out of the step sequence and of
        retention; returns where each went. All processes call it and process 0 moves; in a local
        tier each process moves its own, without waiting for the others."""
        moved = [unused_name(target / step_dir(self.run_dir, s).name) for s in steps]
        if jax.process_index() == 0 or self.local:
            for s, dest in zip(steps, moved):
                dest.parent.mkdir(parents=True, exist_ok=True)
                step_dir(self.run_dir, s).rename(dest)
        if not self.local:
            ocp.multihost.sync_global_processes("tttjax_checkpoint_set_aside")
        self._mngr.reload()
        return moved

    def wait_until_finished(self) -> None:
        """Blocks until the in-flight save is committed; CheckpointError if it failed."""
        with self._save_errors():
            self._mngr.wait_until_finished()

    def close(self) -> None:
        """Waits for the in-flight save, then releases Orbax's threads (also when that save failed: its
        error is raised after they are gone, so none of them outlives the run)."""
        try:
            with self._save_errors():
                self._mngr.wait_until_finished()
        finally:
            try:
                self._mngr.close()
            except Exception:  # the failure just raised, reported again by Orbax's close
                pass


def restore_trainables(step: Path, abstract_params):
    """The trained params (fp32 masters, `state["params"]`) of a step dir, onto the shardings of
    `abstract_params`, exactly as saved (checkpoint.init_state_dir: weights only)."""
    target = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(Path(step) / STATE, args=args)["params"]
