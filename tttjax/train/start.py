"""The run's starting weights, decided in one place.

A run that does not resume starts from: the random init of its seed (born sharded on the mesh),
with the base weights of `moshi_paths.moshi_path` streamed over it when set, and then, when
`checkpoint.init_state_dir` is set, that directory's weights (fresh optimizer, step 0): a step
dir's trained params exactly (as a resume would take them), or a model dir's params where it has
them (LoRA / TTT it lacks start fresh). init_state_dir is opened and checked against the config
by name before anything compiles; it is never loaded by position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tttjax import rundir
from tttjax.checkpoint.compat import check_base_compatible, check_compatible
from tttjax.checkpoint.manager import restore_trainables
from tttjax.model.params import init_model, is_adapter, trainable, trainable_filter
from tttjax.parallel.sharding import frozen_storage_drop
from tttjax.train.state import TrainState
from tttjax.trees import abstract
from tttjax.weights.loader import open_weights
from tttjax.weights.sources import copy_into


def run_metadata(program) -> dict:
    """What a checkpoint of this run records about its model, and what another run must match."""
    return {"architecture": program.cfg.architecture(),
            "trainable": "full" if program.full_finetuning else "adapters"}


class StartingWeights:
    """Opens (and checks) init_state_dir when made; `initial()` builds the weights afterwards."""

    def __init__(self, program):
        self.program = program
        self.init_state = self._open_init_state(program.config.checkpoint.init_state_dir)

    @property
    def _source(self) -> str:
        return f"checkpoint.init_state_dir={self.program.config.checkpoint.init_state_dir}"

    def _open_init_state(self, directory: str):
        if not directory:
            return None
        weights = open_weights(directory)
        if weights.kind == rundir.STEP:
            saved = {"architecture": weights.cfg.architecture(),
                     "trainable": "full" if weights.run_config.full_finetuning else "adapters"}
            check_compatible(saved, run_metadata(self.program), source=self._source)
        else:
            check_base_compatible(weights.cfg, self.program.cfg, source=self._source)
        return weights

    def initial(self) -> tuple[TrainState, dict]:
        """(step-0 state, frozen params) of a fresh run. A resumed run keeps these frozen params (so a
        model dir's base weights given as init_state_dir stay the base) and restores its state."""
        program = self.program
        config = program.config
        model = init_model(program.cfg, program.mesh, config.seed, full_finetuning=program.full_finetuning,
                           frozen_drop=frozen_storage_drop(config.frozen_weights))
        base = config.moshi_paths.moshi_path
        if base:
            copy_into(model, open_weights(base, config.moshi_paths.config_path or None).source,
                      source_name=f"moshi_paths.moshi_path={base}", allow_missing=is_adapter)
        weights = self.init_state
        if weights is not None and weights.kind != rundir.STEP:
            copy_into(model, weights.source, source_name=self._source,
                      allow_missing=lambda p: is_adapter(p) or not trainable(p, program.full_finetuning))
        _, train, frozen = nnx.split(model, trainable_filter(program.full_finetuning), ...)
        masters = jax.tree.map(lambda x: x.astype(jnp.float32), nnx.to_pure_dict(train))
        if weights is not None and weights.kind == rundir.STEP:  # its trained params, exactly as saved
            masters = restore_trainables(weights.path, abstract(masters))
        optimizer = program.optimizer
        state = jax.jit(lambda m: TrainState.create(m, optimizer), out_shardings=program.state_shardings)(masters)
        return state, nnx.to_pure_dict(frozen)
