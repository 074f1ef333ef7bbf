"""The training loop: build or resume the state, then step, with hooks for the rest.

Checkpoint N holds the state after N optimizer steps and the data position N; resuming from it
replays exactly the batches an uninterrupted run would have seen from step N. The run holds its
run_dir's lock throughout and saves only steps whose loss, gradient norm and parameters are finite.
Who decides what: the program (train/program.py) shards and compiles the step; the starting
weights are train/start.py's; which step to resume from, checkpoint/resume.py's; logging,
evaluation and checkpointing are hooks (train/hooks.py). Signals and lost processes are the
watchdog's (train/watchdog.py), which the trainer tells what it is doing: Ctrl-C ends the run like
a preemption (the current step is saved, exit 130), during start-up, compilation and the first
step at once. With `checkpoint.local_dir`, steps are also copied every `local_ckpt_freq` steps to
each host's own disk (the local tier; resume takes the newest intact step of either tier).
"""

from __future__ import annotations

import collections
import math
import os
import time
from pathlib import Path

import jax
from flax import nnx

from tttjax import data as data_lib
from tttjax import rundir
from tttjax.analysis import fit, memory, perf
from tttjax.checkpoint import CheckpointManager, lock
from tttjax.checkpoint.resume import RunIdentity, data_stream, resume
from tttjax.errors import INTERRUPTED, UserError
from tttjax.eval import evaluators
from tttjax.model.config import MOSHI_7B_LM_KWARGS
from tttjax.parallel.distributed import initialize_distributed
from tttjax.parallel.sharding import global_batch, process_batch_slice
from tttjax.train import hooks
from tttjax.train import optimizer as optim_lib
from tttjax.train.logger import RunLogger, check_wandb, say_early
from tttjax.train.program import build_program
from tttjax.train.start import StartingWeights, run_metadata
from tttjax.train.watchdog import EARLY, Watchdog
from tttjax.trees import abstract, fingerprint
from tttjax.weights.export import plan_export
from tttjax.weights.sources import ModelSource


class TrainingError(UserError):
    """A run that must stop without saving (non-finite loss, out of memory)."""


class Trainer:
    """`watchdog` (the CLI's): ends the process promptly on a signal or a lost process; without one
    (a Trainer made in code) signals keep Python's defaults."""

    def __init__(self, config, watchdog: Watchdog | None = None):
        check_wandb(config.wandb)
        initialize_distributed(config.distributed)
        self.config = config
        self.watchdog = watchdog
        self.run_dir = Path(config.run_dir).absolute()
        self.logger = self.manager = self.local = None
        fresh_dir = not self.run_dir.exists()
        lock.acquire(self.run_dir)  # first: a second writer is refused before anything is built
        if watchdog is not None:
            watchdog.attach(self._end_now)
        try:
            self._build()
        except BaseException:  # refused at start-up: a new run_dir is not left behind
            lock.release(self.run_dir, remove_dir=fresh_dir)
            raise

    def _build(self) -> None:
        config = self.config
        self.program = program = build_program(config)
        self.cfg, self.mesh = program.cfg, program.mesh
        self.metadata = run_metadata(program)
        starting = StartingWeights(program)  # opens and checks init_state_dir before anything compiles
        self.evaluations, self.notes = evaluators.build(config, self.cfg, self.mesh, rundir.evals_dir(self.run_dir))
        self._check_memory()
        self.state, self.frozen = starting.initial()
        self.identity = RunIdentity(self.metadata, fingerprint(self.frozen), data_stream(config))
        self.start_example = 0  # the first global example the run reads (set by a resume)
        self.lr_at = optim_lib.one_cycle_lr(config.optim.lr, config.max_steps, config.optim.pct_start)
        self.num_frames = data_lib.num_frames(config.duration_sec)
        self._rates = perf.step_rates(self.cfg, batch_size=config.batch_size, frames=self.num_frames,  # MFU in the log
                                      full_finetuning=program.full_finetuning, devices=self.mesh.devices.reshape(-1))
        self._saving = collections.deque()  # (step, start time) of saves not yet committed, oldest first
        if config.do_ckpt:
            self._open_managers()

    def _open_managers(self) -> None:
        """The persistent checkpoints and, with checkpoint.local_dir, this process's local tier."""
        config, ckpt = self.config, self.config.checkpoint
        metadata = {**self.metadata, "frozen_fingerprint": self.identity.fingerprint,
                    "data_stream": self.identity.data_stream}
        reads = dict(enable_async=ckpt.async_save, read_attempts=ckpt.read_attempts, retry_wait_s=ckpt.retry_wait_s)
        self.manager = CheckpointManager(self.run_dir, max_to_keep=config.num_ckpt_keep,
                                         save_interval_steps=config.ckpt_freq, metadata=metadata,
                                         on_commit=self._log_commit, **reads)
        if ckpt.local_dir:
            self.identity.layout = {"processes": jax.process_count(), "mesh": dict(self.mesh.shape),
                                    "devices": [int(d.id) for d in self.mesh.devices.flat]}
            root = rundir.local_root(ckpt.local_dir, self.run_dir, jax.process_index(), jax.process_count())
            self.local = CheckpointManager(root, max_to_keep=ckpt.local_keep, save_interval_steps=ckpt.local_ckpt_freq,
                                           metadata={**metadata, "layout": self.identity.layout}, local=True, **reads)

    def _check_memory(self) -> None:
        """Start-up check of the step's per-device memory (analysis/fit.py): on an accelerator the
        compiled step's own figures against the device's memory; on CPU the analytic estimate against
        the host's available memory, before anything compiles. A `compiled_step` is loaded here."""
        config = self.config
        fit.check_train_step(
            self.program.compile,
            lambda: memory.estimate_memory(
                self.cfg, batch_size=config.batch_size, num_microbatches=config.num_microbatches,
                num_frames=data_lib.num_frames(config.duration_sec), full_finetuning=self.program.full_finetuning,
                mesh_axes=dict(self.mesh.shape), platform=self.mesh.devices.flat[0].platform,
                frozen_weights=config.frozen_weights),
            mode=config.memory_check, what=self._sizes(hint=True),
            advice=fit.train_advice(self.cfg.remat, dict(self.mesh.shape)),
            platform=self.mesh.devices.flat[0].platform, compile_anyway=bool(config.compiled_step))

    def _sizes(self, hint: bool = False) -> str:
        """The sizes the step's memory depends on; `hint`: say so when the model is the 7B default."""
        config = self.config
        sizes = fit.step_sizes(config.batch_size, config.duration_sec, self.cfg.remat, config.num_microbatches,
                               self.mesh.shape)
        if hint and _default_model(config):
            sizes += " (the model is the 7B default: set moshi_paths or model.*)"
        return sizes

    def model(self):
        """The current weights as a model (trainable params cast to param_dtype, with the frozen)."""
        cast = jax.tree.map(lambda x: x.astype(self.cfg.jnp_param_dtype), self.state.params)
        return nnx.merge(self.program.graphdef, cast, self.frozen)

    # -- checkpoints -----------------------------------------------------------------------------
    def _consolidated(self):
        """The step's PyTorch export as host tensors: gathered slice by slice (a collective with
        several processes), kept on process 0 only, which writes them after the save returns."""
        export = plan_export(self.cfg, ModelSource(self.model()), dtype=self.config.export_dtype,
                             adapters_only=self.config.save_adapters and not self.program.full_finetuning)
        keep = jax.process_index() == 0
        tensors = {name: value for name, value in export.tensors() if keep}
        return tensors, export.config, export.filename

    def _save(self, step: int, next_example: int, force: bool) -> bool:
        """The persistent save of `step` if it is due (or `force`), else its local copy if that is due."""
        if self.manager is None:
            return False
        position = {"next_step": step, "next_example": next_example}
        if not force and not self.manager.should_save(step):
            if self.local is not None and step % self.config.checkpoint.local_ckpt_freq == 0:
                self.local.save(step, self.state, position, force=True)
                self.logger.info(f"local copy of step {step}: {rundir.step_dir(self.local.run_dir, step)}")
            return False
        self._saving.append((step, time.perf_counter()))
        self._phase("export")
        self.logger.info(f"checkpoint {step}: exporting")
        consolidated = self._consolidated()
        self._phase("saving")
        self.logger.info(f"checkpoint {step}: saving")
        if not self.manager.save(step, self.state, position, consolidated, force=True):
            self._saving.pop()
            return False
        if not self.config.checkpoint.async_save:
            self._log_commit()
        return True

    def _log_commit(self) -> None:
        """The oldest pending save was committed (called from Orbax's finalize thread when async)."""
        if self._saving and self.logger is not None:
            step, started = self._saving.popleft()
            self.logger.info(f"checkpoint {step} committed: {rundir.step_dir(self.run_dir, step)} "
                             f"({time.perf_counter() - started:.1f} s)")

    @property
    def interrupted(self) -> bool:
        return self.watchdog is not None and self.watchdog.interrupted

    def _stop_reason(self, step: int) -> str | None:
        """Why the run must end after `step`: a preemption notice (SIGTERM) or Ctrl-C, which the
        watchdog turns into one, at the step the processes agree on (jax.distributed), else as it
        comes (no jax.distributed, or no checkpoints to agree on)."""
        if self.manager is not None and self.manager.reached_preemption(step):
            return "interrupted" if self.interrupted else "preempted"
        stopping = self.watchdog is not None and self.watchdog.stop_requested
        if stopping and (self.manager is None or not jax.distributed.is_initialized()):
            return "interrupted" if self.interrupted else "preempted"
        return None

    def _phase(self, phase: str) -> None:
        if self.watchdog is not None:
            self.watchdog.phase = phase

    def _end_now(self, message: str, code: int, wait_for_save: bool) -> None:
        """The watchdog's way out (from its thread): the save being written commits first if asked,
        the reason goes to the terminal and train.log, the lock is released, the process exits,
        whatever fails on the way (the main thread may be closing the log under it)."""
        try:
            if wait_for_save:
                try:
                    self._wait_for_save()
                except Exception:  # noqa: BLE001 - a failed save: the committed steps stay intact
                    pass
            if self.logger is not None:
                self.logger.say(message, warning=True)
                self.logger.flush()
            else:
                say_early(self.run_dir, message)
            lock.release(self.run_dir)
        finally:
            os._exit(code)

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> int:
        """Train to max_steps (or until preempted / interrupted); returns the process exit code."""
        try:
            return self._run()
        finally:
            for manager in (self.manager, self.local):
                if manager is not None:
                    manager.close()
            if self.logger is not None:
                self.logger.close()
            lock.release(self.run_dir)

    def restore(self) -> int:
        """Restores the step the resume policy picks, if the run has checkpoints; returns the next step."""
        resumed = None if self.manager is None else resume(self.manager, self.config.checkpoint, self.identity,
                                                           abstract(self.state), self.local)
        if resumed is None:
            return 0
        self.notes += resumed.notes
        if resumed.state is None:  # every step damaged, started over (checkpoint.if_all_broken)
            return 0
        if resumed.tier == "local":
            self.notes.append(f"resuming from the local copy of step {resumed.next_step} "
                              f"({rundir.step_dir(self.local.run_dir, resumed.next_step)})")
        self.state, self.start_example = resumed.state, resumed.start_example
        return resumed.next_step

    def _run(self) -> int:
        config = self.config
        start = self.restore()
        self.logger = logger = RunLogger(self.run_dir, config.wandb, config.to_dict())
        for note in self.notes:
            logger.say(f"note: {note}", warning=True)
        if jax.process_index() == 0:
            rundir.write_run_config(self.run_dir, config.to_dict(), start)
        logger.info(f"start at step {start}/{config.max_steps}; model {self.cfg.dim}d x {self.cfg.num_layers} "
                    f"layers, lora_rank={self.cfg.lora_rank}, ttt_layers={list(self.cfg.ttt_layers)}, "
                    f"mesh {dict(self.mesh.shape)}")
        if start >= config.max_steps:
            below = f" (max_steps={config.max_steps} is below it)" if start > config.max_steps else ""
            logger.say(f"nothing to do: the run already reached step {start}{below}; checkpoints "
                       f"{self.manager.all_steps()} in {self.manager.directory}")
            return 0
        progress = hooks.Progress(start, config.max_steps, config.log_freq)
        run_hooks = [progress, hooks.LogMetrics(logger, config.log_freq),
                     hooks.Evaluate(logger, self.evaluations, self.model),
                     hooks.Checkpoint(self._save, self._stop_reason, self._wait_for_save)]
        began, info = time.perf_counter(), None
        if self.manager is not None:
            self.manager.reached_preemption(start)  # this process's position for JAX's sync point, from now
        try:
            batches = self._batches(start)
            self._phase(EARLY[1])
            for step in range(start, config.max_steps):
                info = self._step(step, next(batches), start)
                for hook in run_hooks:
                    self._phase(hook.phase)
                    hook.on_step(info)
                self._phase("training")
                if info.stop:
                    break
        finally:
            for hook in run_hooks:
                hook.close()
        self._phase("finishing")
        return self._finish(start, info, time.perf_counter() - began)

    def _batches(self, start: int):
        config = self.config
        train_data = data_lib.make_dataset(config.data.train_data, num_frames=self.num_frames, card=self.cfg.card,
                                           text_card=self.cfg.text_card, n_q=self.cfg.n_q, seed=config.seed)
        index, count = process_batch_slice(self.mesh, config.batch_size)
        local = data_lib.make_batch_iterator(
            train_data, global_batch_size=config.batch_size, start_step=start, seed=config.seed,
            shuffle=config.data.shuffle, process_index=index, process_count=count,
            num_workers=config.data.num_workers, start_example=self.start_example)
        return (global_batch(self.mesh, rows, config.batch_size) for rows in local)

    def _step(self, step: int, codes, start: int) -> hooks.StepInfo:
        """One optimizer step; a non-finite one or an out-of-memory stops the run (TrainingError)."""
        config = self.config
        tic = time.perf_counter()
        try:
            self.state, metrics = self.program.step(self.state, self.frozen, codes)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        except Exception as e:  # out of memory (compile or run) is the user's sizes; a failed collective may be a lost peer
            if isinstance(e, jax.errors.JaxRuntimeError):
                fit.raise_if_oom(e, TrainingError(f"out of memory at step {step + 1} with {self._sizes()}: "
                                                  f"{fit.train_advice(self.cfg.remat, dict(self.mesh.shape))}"))
            if jax.process_count() > 1 and self.watchdog is not None:
                self.watchdog.wait_for_lost_process()  # a lost process ends this one, naming it
            raise
        done = step + 1
        if not metrics.pop("all_finite"):
            raise self._diverged(done, metrics)
        elapsed = time.perf_counter() - tic
        metrics.update(lr=float(self.lr_at(step)),
                       frames_per_s=config.batch_size * self.num_frames / max(elapsed, 1e-9), **self._rates(elapsed))
        return hooks.StepInfo(done, metrics, self.start_example + (done - start) * config.batch_size,
                              last=done == config.max_steps)

    def _wait_for_save(self) -> None:
        for manager in (self.manager, self.local):
            if manager is not None:
                manager.wait_until_finished()

    def _diverged(self, step: int, metrics: dict) -> TrainingError:
        """The error of a step whose loss, gradient norm or parameters are not finite (never saved)."""
        self._wait_for_save()  # the last finite step may still be in flight
        last = self.manager.latest_step() if self.manager else None
        where = (f"the last checkpoint, step {last} in {self.run_dir}, is finite and a re-run resumes from it"
                 if last is not None else "there is no checkpoint yet, so a re-run starts over")
        return TrainingError(f"non-finite loss, gradient norm or parameters at step {step} (loss "
                             f"{metrics['loss']:.4g}, grad_norm {metrics['grad_norm']:.4g}); not saved; {where} "
                             f"(lower optim.lr or check the data first)")

    def _finish(self, start: int, info: hooks.StepInfo | None, seconds: float) -> int:
        """The run's last line (train.log and the terminal): how it ended and where its checkpoints are."""
        self._wait_for_save()
        done = info.step if info is not None else start
        loss = info.metrics["loss"] if info is not None else math.nan
        where = (f"checkpoints {self.manager.all_steps()} in {self.manager.directory}" if self.manager
                 else "checkpoints off (do_ckpt=false)")
        stop = info.stop if info is not None else None
        if stop is None and self.interrupted:  # Ctrl-C during the last step's evaluation, save or export
            stop = "interrupted"
        if stop:
            saved = f"saved step {done}" if self.manager is not None else "nothing saved (do_ckpt=false)"
            self.logger.say(f"{stop} at step {done} of {self.config.max_steps}: {saved}; re-run the same "
                            f"command to resume; {where}")
            return INTERRUPTED if stop == "interrupted" else 0
        self.logger.say(f"finished: steps {start}->{done} of {self.config.max_steps} in {seconds:.1f} s, last loss "
                        f"{loss:.4f}; {where}")
        return 0


def _default_model(config) -> bool:
    """Whether the run trains the 7B architecture only because nothing named another one."""
    return not config.moshi_paths.config_path and all(config.model[k] == v for k, v in MOSHI_7B_LM_KWARGS.items())
