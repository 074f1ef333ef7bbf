"""The run's program: model config, mesh, parameter split, shardings, optimizer and the jitted step.

Built from the config alone, with abstract parameters (shapes, dtypes and shardings; nothing is
allocated), so that the same object serves the trainer, which then materialises the weights on
the mesh, and `python -m tttjax.compile`, which lowers the step for a TPU topology on any host.
This is the one place that decides how a step is sharded, donated, microbatched and compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from tttjax.config import schema
from tttjax.data.streams import num_frames
from tttjax.errors import UserError
from tttjax.model.config import ModelConfig, from_run_config
from tttjax.model.moshi import abstract_model
from tttjax.model.params import path_of, trainable_filter
from tttjax.parallel.mesh import make_mesh
from tttjax.parallel.sharding import (
    batch_sharding,
    check_batch,
    frozen_storage_drop,
    opt_state_shardings,
    replicated,
    state_shardings,
    under_mesh,
)
from tttjax.train import executable
from tttjax.train import optimizer as optim_lib
from tttjax.train.state import TrainState
from tttjax.train.step import make_loss_fn, make_train_step
from tttjax.trees import abstract


@dataclasses.dataclass
class TrainProgram:
    config: Any  # the run config (ml_collections)
    cfg: ModelConfig
    mesh: Mesh
    graphdef: nnx.GraphDef  # the model's graph; params as (trainable, frozen) pure dicts
    state: TrainState  # abstract, in its shardings
    frozen: dict  # abstract frozen params (param_dtype) in their shardings
    batch: jax.ShapeDtypeStruct  # the global codes [batch_size, 17, T], batch-sharded
    optimizer: optax.GradientTransformation
    train_step: Any  # jitted (state, frozen, codes) -> (state, metrics); the state is donated
    compiler_options: dict | None  # the XLA options the train step compiles with (`compiler_options`)
    compiled: Any = None  # the step compiled ahead of time (`compile`), which `step` then runs

    @property
    def full_finetuning(self) -> bool:
        return bool(self.config.full_finetuning)

    @property
    def state_shardings(self):
        return jax.tree.map(lambda x: x.sharding, self.state)

    def step(self, state, frozen, codes):
        """One train step: the ahead-of-time compiled program if there is one, else the jitted step
        under the mesh (`constrain` sees it while tracing)."""
        if self.compiled is not None:
            return self.compiled(state, frozen, codes)
        return under_mesh(self.mesh, self.train_step)(state, frozen, codes)

    def lower(self):
        """The train step lowered for the abstract state, frozen params and batch (nothing allocated)."""
        with jax.set_mesh(self.mesh):
            return self.train_step.lower(self.state, self.frozen, self.batch)

    def compile(self):
        """Compile the step ahead of time (once), for its memory figures, or load the one
        `compiled_step` names (train/executable.py); `step` runs this program."""
        if self.compiled is None:
            saved = self.config.compiled_step
            self.compiled = executable.load(saved, self) if saved else self.lower().compile()
        return self.compiled

    def eval_model(self):
        """The abstract model the trainer evaluates: trainable params cast to param_dtype, with the frozen."""
        cast = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, self.cfg.jnp_param_dtype, sharding=x.sharding),
                            self.state.params)
        return nnx.merge(self.graphdef, cast, self.frozen)


def compiler_options(config, mesh: Mesh) -> dict | None:
    """XLA options of the train step: libtpu's windowed einsums off where `windowed_einsum` is false
    (per compile, so `tttjax.compile --search` compares both in one process; docs/distributed.md)."""
    if config.windowed_einsum or mesh.devices.flat[0].platform != "tpu":
        return None
    return {f"xla_tpu_enable_windowed_einsum_for_{op}": False for op in ("all_gather", "reduce_scatter")}


def build_program(config, devices=None) -> TrainProgram:
    """The program of `config` on `devices` (default: all of this job's; or a TPU topology's)."""
    schema.validate(config)  # a config built in code has not been through the reader
    cfg = from_run_config(config)
    mesh = make_mesh(config.mesh.to_dict(), devices)
    check_batch(mesh, config.batch_size, config.num_microbatches)
    graphdef, trainable, frozen = nnx.split(abstract_model(cfg), trainable_filter(config.full_finetuning), ...)
    masters = abstract(nnx.to_pure_dict(trainable), nnx.to_pure_dict(state_shardings(trainable, mesh)), jnp.float32)
    if not jax.tree.leaves(masters):
        raise UserError("no trainable parameters: enable lora, ttt or full_finetuning")
    held = None  # gather_once: the frozen weights' shardings while a step holds them (gathered over fsdp)
    if config.frozen_weights == "gather_once":
        held = nnx.to_pure_dict(state_shardings(frozen, mesh, ("fsdp",)))
    frozen = abstract(nnx.to_pure_dict(frozen),
                      nnx.to_pure_dict(state_shardings(frozen, mesh, frozen_storage_drop(config.frozen_weights))))
    labels = jax.tree_util.tree_map_with_path(lambda p, _: optim_lib.param_group(path_of(p)), masters)
    optimizer = optim_lib.make_optimizer(config.optim, config.max_steps, labels)
    opt_state = jax.eval_shape(optimizer.init, masters)
    rep = replicated(mesh)
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params=masters,
                       opt_state=abstract(opt_state, opt_state_shardings(opt_state, masters, mesh)))
    batch = jax.ShapeDtypeStruct((config.batch_size, cfg.num_codebooks, num_frames(config.duration_sec)), jnp.int32,
                                 sharding=batch_sharding(mesh))
    loss_fn = make_loss_fn(graphdef, cfg, text_padding_weight=config.text_padding_weight,
                           first_codebook_weight_multiplier=config.first_codebook_weight_multiplier)
    shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    options = compiler_options(config, mesh)
    train_step = jax.jit(make_train_step(loss_fn, optimizer, config.num_microbatches, hold_frozen=held),
                         in_shardings=(shardings(state), shardings(frozen), batch.sharding),
                         out_shardings=(shardings(state), rep), donate_argnums=(0,),
                         compiler_options=options)
    return TrainProgram(config, cfg, mesh, graphdef, state, frozen, batch, optimizer, train_step, options)
