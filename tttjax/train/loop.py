"""The training loop: build or resume the state, step, log, evaluate, checkpoint, handle preemption.

Checkpoint N holds the state after N optimizer steps and the data position N; resuming from it
replays exactly the batches an uninterrupted run would have seen from step N. The run holds its
run_dir's lock throughout, saves only steps whose loss, gradient norm and parameters are finite,
and on resume skips (moves aside) a step that does not restore, sets aside the steps after an
explicit earlier `resume_step`, and refuses a changed data stream unless it is allowed.
"""

from __future__ import annotations

import collections
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from conversion.export import plan_export
from conversion.sources import ModelSource, copy_into
from tttjax import data as data_lib
from tttjax.analysis import fit, memory, perf
from tttjax import rundir
from tttjax.checkpoint import BrokenCheckpoint, CheckpointManager, check_compatible, lock
from tttjax.checkpoint.compat import check_base_compatible
from tttjax.checkpoint.manager import restore_trainables
from tttjax.eval.standard import Evaluator
from tttjax.model.params import is_adapter, trainable, trainable_filter
from tttjax.parallel.distributed import initialize_distributed
from tttjax.parallel.sharding import global_batch, process_batch_slice
from tttjax.train import optimizer as optim_lib
from tttjax.train import state as state_lib
from tttjax.train.logger import RunLogger, check_wandb
from tttjax.train.program import build_program
from tttjax.train.step import all_finite
from tttjax.weights import open_weights


class TrainingError(RuntimeError):
    """A run that must stop without saving (non-finite loss, inconsistent run dir)."""


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# What decides the examples each step trains on and how they are averaged; saved with every step.
DATA_STREAM_KEYS = ("seed", "batch_size", "num_microbatches", "duration_sec", "data.train_data", "data.shuffle")


def data_stream(config) -> dict:
    """{key: value} of DATA_STREAM_KEYS in `config`."""
    out = {}
    for key in DATA_STREAM_KEYS:
        value = config
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out


class Trainer:
    def __init__(self, config):
        if config.checkpoint.resume not in ("auto", "never"):
            raise ValueError(f"checkpoint.resume={config.checkpoint.resume!r}: expected auto|true or never|false")
        check_wandb(config.wandb)
        initialize_distributed()
        self.config = config
        self.run_dir = Path(config.run_dir).absolute()
        lock.acquire(self.run_dir)  # first: a second writer is refused before anything is built
        self.program = program = build_program(config)
        self.cfg, self.mesh, self.graphdef = program.cfg, program.mesh, program.graphdef
        self.full = program.full_finetuning
        self.metadata = {"architecture": self.cfg.architecture(),
                         "trainable": "full" if self.full else "adapters"}
        self._init_weights = self._open_init_state(config.checkpoint.init_state_dir)
        self._check_memory()

        masters, self.frozen = state_lib.initial_weights(program)
        self.optimizer = program.optimizer
        # Params are born sharded (init_model); the optimizer state is created directly in the same
        # shardings (Adam moments like their parameter), and the jitted step keeps them all.
        self._init_opt = jax.jit(self.optimizer.init, out_shardings=program.state_shardings["opt_state"])
        self.state = jax.jit(lambda m: {"step": jnp.zeros((), jnp.int32), "params": m,
                                        "opt_state": self.optimizer.init(m)},
                             out_shardings=program.state_shardings)(masters)
        self.fingerprint = state_lib.fingerprint(self.frozen)
        self.data_stream = data_stream(config)
        self.start_example = 0  # the first global example the run reads (set by a resume)
        self.notes: list[str] = []  # what the resume set aside or accepted, logged by `run`
        self.step_fn = program.step
        self.lr_at = optim_lib.one_cycle_lr(config.optim.lr, config.max_steps, config.optim.pct_start)
        self.num_frames = data_lib.num_frames(config.duration_sec)
        self._rates = perf.step_rates(self.cfg, batch_size=config.batch_size, frames=self.num_frames,  # MFU in the log
                                      full_finetuning=self.full, devices=self.mesh.devices.reshape(-1))
        self.manager = None
        self.logger = None
        self._saving = collections.deque()  # (step, start time) of saves not yet committed, oldest first
        if config.do_ckpt:
            self.manager = CheckpointManager(
                self.run_dir, max_to_keep=config.num_ckpt_keep, save_interval_steps=config.ckpt_freq,
                enable_async=config.checkpoint.async_save,
                metadata={**self.metadata, "frozen_fingerprint": self.fingerprint, "data_stream": self.data_stream},
                on_commit=self._log_commit)
        self._evaluator = self._eval_data = None

    # -- construction --------------------------------------------------------------------------
    def _open_init_state(self, directory: str):
        """checkpoint.init_state_dir's weights (None if unset), refused by name, before anything compiles,
        unless they fit: a step dir's trainables must be exactly ours (as on resume); a model dir
        must match where it has params (LoRA / TTT it lacks start fresh). Never loaded by position."""
        if not directory:
            return None
        source = f"checkpoint.init_state_dir={directory}"
        weights = open_weights(directory)
        if weights.kind == rundir.STEP:
            saved = {"architecture": weights.cfg.architecture(),
                     "trainable": "full" if weights.run_config.full_finetuning else "adapters"}
            check_compatible(saved, self.metadata, source=source)
        else:
            check_base_compatible(weights.cfg, self.cfg, source=source)
        return weights

    def _load_init_state(self) -> None:
        """checkpoint.init_state_dir: weights only, from a step dir (trainables) or a model dir."""
        weights = self._init_weights
        source = f"checkpoint.init_state_dir={self.config.checkpoint.init_state_dir}"
        if weights.kind == rundir.STEP:
            params = restore_trainables(weights.path, _abstract(self.state["params"]))
            self.state["params"] = params
            self.state["opt_state"] = self._init_opt(params)
            return
        model = nnx.merge(self.graphdef, self._cast(self.state["params"]), self.frozen)
        copy_into(model, weights.source, source_name=source,
                  allow_missing=lambda p: is_adapter(p) or not trainable(p, self.full))
        _, trainable_state, frozen = nnx.split(model, trainable_filter(self.full), ...)
        self.frozen = nnx.to_pure_dict(frozen)
        params = jax.tree.map(lambda x: x.astype(jnp.float32), nnx.to_pure_dict(trainable_state))
        self.state = {"step": self.state["step"], "params": params, "opt_state": self._init_opt(params)}
        self.fingerprint = state_lib.fingerprint(self.frozen)

    def _check_memory(self) -> None:
        """Start-up check of the step's per-device memory (analysis/fit.py): on an accelerator the
        compiled step's own figures against the device's memory; on CPU the analytic estimate against
        the host's available memory, before anything compiles. A `compiled_step` is loaded here."""
        config = self.config
        fit.check_train_step(
            self.program.compile,
            lambda: memory.estimate_memory(
                self.cfg, batch_size=config.batch_size, num_microbatches=config.num_microbatches,
                num_frames=data_lib.num_frames(config.duration_sec), full_finetuning=self.full,
                mesh_axes=dict(self.mesh.shape), platform=self.mesh.devices.flat[0].platform,
                frozen_weights=config.frozen_weights),
            mode=config.memory_check, what=self._sizes(), advice=fit.train_advice(self.cfg.remat, dict(self.mesh.shape)),
            platform=self.mesh.devices.flat[0].platform, compile_anyway=bool(config.compiled_step))

    def _sizes(self) -> str:
        config = self.config
        return fit.step_sizes(config.batch_size, config.duration_sec, self.cfg.remat, config.num_microbatches,
                              self.mesh.shape)

    def _cast(self, params):
        return jax.tree.map(lambda x: x.astype(self.cfg.jnp_param_dtype), params)

    def _resume_or_init(self) -> int:
        """Restore the latest restorable / chosen checkpoint if any, else apply init_state_dir; returns
        the step.

        Auto-resume tries the steps newest first; the ones newer than the first that restores move to
        checkpoints.broken/ (they are recomputed); if none restores, nothing moves and the resume is
        refused. An explicit resume_step to a step that does not restore is refused. Steps
        after the restored one (an earlier resume_step) move to checkpoints.superseded/, so the new
        run saves its own. What was moved is in `self.notes`.
        """
        config = self.config
        steps = self.manager.all_steps() if self.manager else []
        if steps and config.checkpoint.resume == "never":
            raise TrainingError(f"{self.run_dir} already has checkpoints {steps}; set checkpoint.resume=auto "
                                f"to continue it or choose a new run_dir")
        if not steps:
            if self._init_weights is not None:
                self._load_init_state()
            return 0
        wanted = config.checkpoint.resume_step
        if wanted != -1:
            try:
                step, position = wanted, self._restore(wanted)
            except BrokenCheckpoint as e:
                raise TrainingError(f"checkpoint.resume_step={wanted}: {e}") from None
        else:
            broken = {}
            for step in reversed(steps):
                try:
                    position = self._restore(step)
                    break
                except BrokenCheckpoint as e:
                    broken[step] = e
            else:  # nothing moves: a config that no step fits must not look like damage to all of them
                raise TrainingError(f"no checkpoint of {self.run_dir} restores (newest: {broken[steps[-1]]}); "
                                    f"nothing was moved") from None
            for bad, error in sorted(broken.items()):
                [moved] = self.manager.set_aside([bad], rundir.broken_dir(self.run_dir))
                self.notes.append(f"skipped checkpoint step {bad} ({error}); moved it to {moved}")
        later = [s for s in self.manager.all_steps() if s > step]
        if later:
            moved = self.manager.set_aside(later, rundir.superseded_dir(self.run_dir, step))
            self.notes.append(f"resuming from step {step}: moved the later steps {later} to {moved[0].parent}; "
                              f"this run saves its own")
        return int(position["next_step"])

    def _restore(self, step: int) -> dict:
        """Restores `step` into self.state (and self.start_example); returns its data position.

        BrokenCheckpoint if it does not restore completely (unreadable, or non-finite params);
        a changed architecture, base or data stream is refused (those are not damage)."""
        saved = self.manager.restore_metadata(step)
        check_compatible({k: saved.get(k) for k in self.metadata}, self.metadata,
                         source=f"checkpoint in {self.run_dir}")
        if not state_lib.same_fingerprint(saved["frozen_fingerprint"], self.fingerprint):
            raise TrainingError(f"the frozen base weights differ from those checkpoint {self.run_dir} was "
                                f"trained on (moshi_paths / seed changed?)")
        saved_stream = saved.get("data_stream") or self.data_stream  # older checkpoints did not record it
        try:
            check_compatible(saved_stream, self.data_stream, source=f"the data stream of checkpoint step {step}")
        except ValueError as e:
            if not self.config.checkpoint.allow_data_change:
                raise TrainingError(f"{e}; set checkpoint.allow_data_change=true to resume with the new "
                                    f"one") from None
            self.notes.append(f"{e}; accepted (checkpoint.allow_data_change): the run continues after the "
                              f"examples it has seen")
        state, position = self.manager.restore(step, _abstract(self.state))
        if not bool(all_finite(state["params"])):
            raise BrokenCheckpoint(f"{rundir.step_dir(self.run_dir, step)} holds non-finite parameters")
        self.state = state
        self.start_example = int(position.get("next_example",
                                              position["next_step"] * saved_stream["batch_size"]))
        return position

    # -- checkpoint contents -------------------------------------------------------------------
    def _consolidated(self):
        """The step's PyTorch export as host tensors: gathered slice by slice (a collective with
        several processes), kept on process 0 only, which writes them after the save returns."""
        model = nnx.merge(self.graphdef, self._cast(self.state["params"]), self.frozen)
        export = plan_export(self.cfg, ModelSource(model), dtype=self.config.export_dtype,
                             adapters_only=self.config.save_adapters and not self.full)
        keep = jax.process_index() == 0
        tensors = {name: value for name, value in export.tensors() if keep}
        return tensors, export.config, export.filename

    def _save(self, step: int, next_example: int, force: bool) -> bool:
        if self.manager is None or (not force and not self.manager.should_save(step)):
            return False
        self._saving.append((step, time.perf_counter()))
        position = {"next_step": step, "next_example": next_example}
        if not self.manager.save(step, self.state, position, self._consolidated(), force=True):
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

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Standard metrics of the current params on data.eval_data (the same `Evaluator` as tttjax.eval)."""
        config = self.config
        if self._evaluator is None:
            self._evaluator = Evaluator(text_padding_weight=config.text_padding_weight,
                                        first_codebook_weight_multiplier=config.first_codebook_weight_multiplier,
                                        mesh=self.mesh)
            self._eval_data = self._dataset(config.data.eval_data)
        index, count = process_batch_slice(self.mesh, config.batch_size)
        batches = (self._global_batch(local) for local in data_lib.make_eval_iterator(
            self._eval_data, batch_size=config.batch_size, process_index=index, process_count=count))
        model = nnx.merge(self.graphdef, self._cast(self.state["params"]), self.frozen)
        return self._evaluator(model, batches, max_batches=config.eval_batches)

    # -- data ----------------------------------------------------------------------------------
    def _dataset(self, spec: str):
        cfg = self.cfg
        return data_lib.make_dataset(spec, num_frames=self.num_frames, card=cfg.card, text_card=cfg.text_card,
                                     n_q=cfg.n_q, seed=self.config.seed)

    def _global_batch(self, local: np.ndarray):
        """The global [batch_size, 17, T] codes from this process's rows (see process_batch_slice)."""
        return global_batch(self.mesh, local, self.config.batch_size)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        """Train to max_steps (or until preempted); returns the process exit code."""
        config = self.config
        try:
            return self._run()
        finally:
            lock.release(self.run_dir)

    def _run(self) -> int:
        config = self.config
        start = self._resume_or_init()
        self.logger = logger = RunLogger(self.run_dir, config.wandb, config.to_dict())
        for note in self.notes:
            logger.warning(note)
        self._write_args(start)
        logger.info(f"start at step {start}/{config.max_steps}; model {self.cfg.dim}d x {self.cfg.num_layers} "
                    f"layers, lora_rank={self.cfg.lora_rank}, ttt_layers={list(self.cfg.ttt_layers)}, "
                    f"mesh {dict(self.mesh.shape)}")
        if start >= config.max_steps:
            logger.info("nothing to do: the run already reached max_steps")
            logger.close()
            return 0
        train_data = self._dataset(config.data.train_data)
        index, count = process_batch_slice(self.mesh, config.batch_size)
        batches = data_lib.make_batch_iterator(
            train_data, global_batch_size=config.batch_size, start_step=start, seed=config.seed,
            shuffle=config.data.shuffle, process_index=index, process_count=count,
            num_workers=config.data.num_workers, start_example=self.start_example)
        progress = _progress(start, config.max_steps)
        frames_per_step = config.batch_size * self.num_frames
        tic = began = time.perf_counter()
        done, last_loss, finished = start, math.nan, False
        try:
            for step in range(start, config.max_steps):
                try:
                    self.state, metrics = self.step_fn(self.state, self.frozen, self._global_batch(next(batches)))
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                except jax.errors.JaxRuntimeError as e:  # out of memory (compile or run) is the user's sizes
                    fit.raise_if_oom(e, TrainingError(f"out of memory at step {step + 1} with {self._sizes()}: "
                                                      f"{fit.train_advice(self.cfg.remat, dict(self.mesh.shape))}"))
                    raise
                done = step + 1
                if not metrics.pop("all_finite"):
                    raise self._diverged(done, metrics)
                last_loss = metrics["loss"]
                elapsed = time.perf_counter() - tic
                tic = time.perf_counter()
                metrics.update(lr=float(self.lr_at(step)), frames_per_s=frames_per_step / max(elapsed, 1e-9),
                               **self._rates(elapsed))
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['loss']:.3f}", fps=f"{metrics['frames_per_s']:.0f}")
                if done % config.log_freq == 0 or done == config.max_steps:
                    logger.scalars(done, "train", metrics)
                    logger.info(f"step {done} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
                if config.eval_freq and config.data.eval_data and done % config.eval_freq == 0:
                    results = self.evaluate()
                    logger.scalars(done, "eval", results)
                    logger.info(f"eval step {done} train_objective={results['train_objective']:.4f} "
                                f"text_ce={results['text_ce']:.4f} audio_ce={results['audio_ce']:.4f}")
                preempted = self.manager is not None and self.manager.reached_preemption(done)
                next_example = self.start_example + (done - start) * config.batch_size
                self._save(done, next_example, force=preempted or done == config.max_steps)
                if preempted:
                    self.manager.wait_until_finished()
                    logger.info(f"preempted: saved step {done}, exiting")
                    finished = True
                    return 0
            finished = True
        finally:
            progress.close()
            if self.manager is not None:
                self.manager.close()
            if finished:
                self._summarize(start, done, time.perf_counter() - began, last_loss)
            logger.close()
        return 0

    def _diverged(self, step: int, metrics: dict) -> TrainingError:
        """The error of a step whose loss, gradient norm or parameters are not finite (never saved)."""
        if self.manager is not None:
            self.manager.wait_until_finished()  # the last finite step may still be in flight
        last = self.manager.latest_step() if self.manager else None
        return TrainingError(f"non-finite loss, gradient norm or parameters at step {step} (loss "
                             f"{metrics['loss']:.4g}, grad_norm {metrics['grad_norm']:.4g}); stopping without "
                             f"saving it; last checkpoint (finite): {last} in {self.run_dir}, where a re-run "
                             f"resumes (lower optim.lr or check the data first)")

    def _summarize(self, start: int, done: int, seconds: float, last_loss: float) -> None:
        """The run's last log line (also printed): steps, wall time, last loss, where the checkpoints are."""
        summary = (f"finished: steps {start}->{done} of {self.config.max_steps} in {seconds:.1f} s, last loss "
                   f"{last_loss:.4f}; checkpoints " + (f"{self.manager.all_steps()} in {self.manager.directory}"
                                                      if self.manager else "off (do_ckpt=false)"))
        self.logger.info(summary)
        if jax.process_index() == 0:
            print(summary)

    def _write_args(self, start: int) -> None:
        if jax.process_index() == 0:
            rundir.write_run_config(self.run_dir, self.config.to_dict(), start)


def _progress(start: int, total: int):
    return tqdm(total=total, initial=start, desc="train", unit="step", disable=jax.process_index() != 0,
                dynamic_ncols=True, leave=False)  # cleared at the end: the summary (or an error) is the last line
