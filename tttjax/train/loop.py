"""The training loop: build or resume the state, step, log, evaluate, checkpoint, handle preemption.

Checkpoint N holds the state after N optimizer steps and the data position N; resuming from it
replays exactly the batches an uninterrupted run would have seen from step N.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from conversion.sources import ModelSource, copy_into
from tttjax import data as data_lib
from tttjax.checkpoint import CheckpointManager, check_compatible, restore_params
from tttjax import sharding as sharding_lib
from tttjax.sharding import initialize_distributed, make_mesh, replicated
from tttjax.train import optimizer as optim_lib
from tttjax.train import state as state_lib
from tttjax.train.logger import RunLogger
from tttjax.train.step import make_loss_fn, make_train_step


class TrainingError(RuntimeError):
    """A run that must stop without saving (non-finite loss, inconsistent run dir)."""


def _check_config(config) -> None:
    if config.max_steps < 1:
        raise ValueError(f"max_steps={config.max_steps} must be >= 1")
    if config.batch_size % config.num_microbatches:
        raise ValueError(f"batch_size={config.batch_size} is not divisible by "
                         f"num_microbatches={config.num_microbatches}")
    if not config.full_finetuning and not config.lora.enable and not config.ttt.enable:
        raise ValueError("nothing to train: enable lora, ttt or full_finetuning")
    if config.checkpoint.resume not in ("auto", "never"):
        raise ValueError(f"checkpoint.resume={config.checkpoint.resume!r}: expected 'auto' or 'never'")


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Trainer:
    def __init__(self, config):
        _check_config(config)
        initialize_distributed()
        self.config = config
        self.cfg = state_lib.model_config(config)
        self.mesh = make_mesh(config.mesh.to_dict())
        self.run_dir = Path(config.run_dir).absolute()
        self.full = bool(config.full_finetuning)
        sharding_lib.check_batch(self.mesh, config.batch_size, config.num_microbatches)
        self._check_memory()

        model = state_lib.build_model(config, self.cfg, self.mesh)
        self.graphdef, trainable, frozen = nnx.split(model, state_lib.trainable_filter(self.full), ...)
        self.frozen = nnx.to_pure_dict(frozen)
        masters = jax.tree.map(lambda x: x.astype(jnp.float32), nnx.to_pure_dict(trainable))
        if not jax.tree.leaves(masters):
            raise ValueError("no trainable parameters: enable lora, ttt or full_finetuning")
        labels = jax.tree_util.tree_map_with_path(
            lambda p, _: optim_lib.param_group(tuple(str(getattr(k, "key", k)) for k in p)), masters)
        self.optimizer = optim_lib.make_optimizer(config.optim, config.max_steps, labels)
        # Params are born sharded (state_lib.init_model); the optimizer state is created directly in
        # the same shardings (Adam moments like their parameter), and the jitted step keeps them all.
        rep = replicated(self.mesh)
        param_shardings = jax.tree.map(lambda x: x.sharding, masters)
        self.state_shardings = {"step": rep, "params": param_shardings, "opt_state": sharding_lib.opt_state_shardings(
            jax.eval_shape(self.optimizer.init, masters), masters, self.mesh)}
        self._init_opt = jax.jit(self.optimizer.init, out_shardings=self.state_shardings["opt_state"])
        self.state = jax.jit(lambda m: {"step": jnp.zeros((), jnp.int32), "params": m,
                                        "opt_state": self.optimizer.init(m)},
                             out_shardings=self.state_shardings)(masters)
        self.metadata = {"architecture": self.cfg.architecture(),
                         "trainable": "full" if self.full else "adapters"}
        self.fingerprint = state_lib.fingerprint(self.frozen)

        loss_fn = make_loss_fn(self.graphdef, self.cfg, text_padding_weight=config.text_padding_weight,
                               first_codebook_weight_multiplier=config.first_codebook_weight_multiplier)
        step_fn = make_train_step(loss_fn, self.optimizer, config.num_microbatches)
        frozen_shardings = jax.tree.map(lambda x: x.sharding, self.frozen)
        self.step_fn = sharding_lib.under_mesh(self.mesh, jax.jit(
            step_fn, in_shardings=(self.state_shardings, frozen_shardings, sharding_lib.batch_sharding(self.mesh)),
            out_shardings=(self.state_shardings, rep), donate_argnums=(0,)))
        self.lr_at = optim_lib.one_cycle_lr(config.optim.lr, config.max_steps, config.optim.pct_start)
        self.num_frames = data_lib.num_frames(config.duration_sec)
        self.manager = None
        if config.do_ckpt:
            self.manager = CheckpointManager(
                self.run_dir, max_to_keep=config.num_ckpt_keep, save_interval_steps=config.ckpt_freq,
                enable_async=config.checkpoint.async_save,
                metadata={**self.metadata, "frozen_fingerprint": self.fingerprint})

    # -- construction --------------------------------------------------------------------------
    def _load_init_state(self, directory: str) -> None:
        """checkpoint.init_state_dir: weights only, from a step dir (trainables) or a model dir."""
        path = Path(directory)
        if (path / "state").is_dir():
            params = restore_params(path, _abstract(self.state["params"]))
            self.state["params"] = params
            self.state["opt_state"] = self._init_opt(params)
            return
        model = nnx.merge(self.graphdef, self._cast(self.state["params"]), self.frozen)
        trainable = state_lib.trainable_filter(self.full)
        copy_into(model, state_lib.weights_source(path, None), source_name=f"checkpoint.init_state_dir={directory}",
                  allow_missing=lambda p: state_lib.is_lora(p) or state_lib.is_ttt(p) or not trainable(p, None))
        _, trainable_state, frozen = nnx.split(model, trainable, ...)
        self.frozen = nnx.to_pure_dict(frozen)
        params = jax.tree.map(lambda x: x.astype(jnp.float32), nnx.to_pure_dict(trainable_state))
        self.state = {"step": self.state["step"], "params": params, "opt_state": self._init_opt(params)}
        self.fingerprint = state_lib.fingerprint(self.frozen)

    def _check_memory(self) -> None:
        """Start-up check: the per-device memory estimate against the device's memory."""
        config = self.config
        capacity = sharding_lib.device_memory_bytes()
        if config.memory_check == "off" or capacity is None:
            sharding_lib.check_memory(None, None, mode=config.memory_check, what="")  # validates the mode
            return
        estimate = sharding_lib.estimate_memory(
            self.cfg, batch_size=config.batch_size, num_microbatches=config.num_microbatches,
            num_frames=data_lib.num_frames(config.duration_sec), full_finetuning=self.full,
            mesh_axes=dict(self.mesh.shape))
        sharding_lib.check_memory(estimate, capacity, mode=config.memory_check,
                                  what=f"mesh {dict(self.mesh.shape)}, remat={self.cfg.remat}")

    def _cast(self, params):
        return jax.tree.map(lambda x: x.astype(self.cfg.jnp_param_dtype), params)

    def _resume_or_init(self) -> int:
        """Restore the latest/chosen checkpoint if any, else apply init_state_dir; returns the step."""
        config = self.config
        steps = self.manager.all_steps() if self.manager else []
        if steps and config.checkpoint.resume == "never":
            raise TrainingError(f"{self.run_dir} already has checkpoints {steps}; set checkpoint.resume=auto "
                                f"to continue it or choose a new run_dir")
        if not steps:
            if config.checkpoint.init_state_dir:
                self._load_init_state(config.checkpoint.init_state_dir)
            return 0
        step = config.checkpoint.resume_step
        saved = self.manager.restore_metadata(step)
        check_compatible({k: saved.get(k) for k in self.metadata}, self.metadata,
                         source=f"checkpoint in {self.run_dir}")
        if not state_lib.same_fingerprint(saved["frozen_fingerprint"], self.fingerprint):
            raise TrainingError(f"the frozen base weights differ from those checkpoint {self.run_dir} was "
                                f"trained on (moshi_paths / seed changed?)")
        self.state, position = self.manager.restore(step, _abstract(self.state))
        return int(position["next_step"])

    # -- checkpoint contents -------------------------------------------------------------------
    def _consolidated(self):
        """The step's PyTorch export as host tensors: gathered slice by slice (a collective with
        several processes), kept on process 0 only, which writes them after the save returns."""
        from conversion.to_pytorch import plan_export

        model = nnx.merge(self.graphdef, self._cast(self.state["params"]), self.frozen)
        export = plan_export(self.cfg, ModelSource(model), dtype=self.config.export_dtype,
                             adapters_only=self.config.save_adapters and not self.full)
        keep = jax.process_index() == 0
        tensors = {name: value for name, value in export.tensors() if keep}
        return tensors, export.config, export.filename

    def _save(self, step: int, force: bool) -> bool:
        if self.manager is None or (not force and not self.manager.should_save(step)):
            return False
        return self.manager.save(step, self.state, {"next_step": step}, self._consolidated(), force=True)

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        from tttjax.eval.metrics import accumulate, make_terms_fn, standard_metrics

        config = self.config
        if not hasattr(self, "_eval_terms"):
            terms = make_terms_fn(self.cfg, text_padding_weight=config.text_padding_weight,
                                  first_codebook_weight_multiplier=config.first_codebook_weight_multiplier)
            self._eval_terms = sharding_lib.under_mesh(self.mesh, jax.jit(
                lambda p, f, c: terms(nnx.merge(self.graphdef, p, f), c), out_shardings=replicated(self.mesh)))
            self._eval_data = self._dataset(config.data.eval_data)
        params = self._cast(self.state["params"])

        def batches():
            index, count = sharding_lib.process_batch_slice(self.mesh, config.batch_size)
            it = data_lib.make_eval_iterator(self._eval_data, batch_size=config.batch_size,
                                             process_index=index, process_count=count)
            for i, local in enumerate(it):
                if config.eval_batches and i >= config.eval_batches:
                    break
                yield self._eval_terms(params, self.frozen, self._global_batch(local))

        return standard_metrics(accumulate(batches()))

    # -- data ----------------------------------------------------------------------------------
    def _dataset(self, spec: str):
        cfg = self.cfg
        return data_lib.make_dataset(spec, num_frames=self.num_frames, card=cfg.card, text_card=cfg.text_card,
                                     n_q=cfg.n_q, seed=self.config.seed)

    def _global_batch(self, local: np.ndarray):
        """The global [batch_size, 17, T] codes from this process's rows (see process_batch_slice)."""
        return sharding_lib.global_batch(self.mesh, local, self.config.batch_size)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        """Train to max_steps (or until preempted); returns the process exit code."""
        config = self.config
        start = self._resume_or_init()
        logger = RunLogger(self.run_dir, config.wandb, config.to_dict())
        self._write_args(start)
        logger.info(f"start at step {start}/{config.max_steps}; model {self.cfg.dim}d x {self.cfg.num_layers} "
                    f"layers, lora_rank={self.cfg.lora_rank}, ttt_layers={list(self.cfg.ttt_layers)}, "
                    f"mesh {dict(self.mesh.shape)}")
        if start >= config.max_steps:
            logger.info("nothing to do: the run already reached max_steps")
            logger.close()
            return 0
        train_data = self._dataset(config.data.train_data)
        index, count = sharding_lib.process_batch_slice(self.mesh, config.batch_size)
        batches = data_lib.make_batch_iterator(
            train_data, global_batch_size=config.batch_size, start_step=start, seed=config.seed,
            shuffle=config.data.shuffle, process_index=index, process_count=count,
            num_workers=config.data.num_workers)
        progress = _progress(start, config.max_steps)
        frames_per_step = config.batch_size * self.num_frames
        tic = time.perf_counter()
        step = start
        try:
            for step in range(start, config.max_steps):
                self.state, metrics = self.step_fn(self.state, self.frozen, self._global_batch(next(batches)))
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not math.isfinite(metrics["loss"]):
                    raise TrainingError(f"non-finite loss {metrics['loss']} at step {step + 1}; stopping without "
                                        f"saving (last good checkpoint: "
                                        f"{self.manager.latest_step() if self.manager else None})")
                done = step + 1
                elapsed = time.perf_counter() - tic
                tic = time.perf_counter()
                metrics.update(lr=float(self.lr_at(step)), frames_per_s=frames_per_step / max(elapsed, 1e-9))
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
                self._save(done, force=preempted or done == config.max_steps)
                if preempted:
                    self.manager.wait_until_finished()
                    logger.info(f"preempted: saved step {done}, exiting")
                    return 0
        finally:
            progress.close()
            if self.manager is not None:
                self.manager.close()
            logger.close()
        return 0

    def _write_args(self, start: int) -> None:
        if jax.process_index() != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        args = self.run_dir / "args.yaml"
        text = yaml.safe_dump(self.config.to_dict(), sort_keys=True)
        if start and args.exists() and args.read_text() != text:
            args.rename(self.run_dir / f"args.before_step_{start:06d}.yaml")
        args.write_text(text)


def _progress(start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", disable=jax.process_index() != 0,
                dynamic_ncols=True)
