"""The train state: what a checkpoint's `state/` item holds and the jitted step carries.

Trainable parameters live here as fp32 master copies (so the optimizer state is fp32 too) and are
cast to `param_dtype` for the forward pass; the frozen rest is not part of the state (it is
re-derived from `moshi_paths` / the seed, and its fingerprint is checked on resume). On disk the
state is the mapping {step, params, opt_state}, as it always was.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps taken (int32 scalar)
    params: Any  # fp32 master copies of the trainable params (a pure dict by path)
    opt_state: Any  # the optimizer's state

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation) -> TrainState:
        """Step 0: `params` with a fresh optimizer state."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    def apply(self, grads, optimizer: optax.GradientTransformation) -> TrainState:
        """One optimizer step."""
        updates, opt_state = optimizer.update(grads, self.opt_state, self.params)
        return TrainState(step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state)
