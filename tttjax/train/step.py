"""The jitted train step: microbatched forward/backward, clipping, AdamW, fp32 masters."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tttjax.objective import model_terms, objective
from tttjax.parallel.sharding import constrain
from tttjax.train.state import TrainState
from tttjax.trees import all_finite


def make_loss_fn(graphdef, cfg, *, text_padding_weight: float, first_codebook_weight_multiplier: float):
    """loss(trainable fp32, frozen, codes) -> (total, aux); trainable is cast to param_dtype first."""
    param_dtype = cfg.jnp_param_dtype

    def loss_fn(trainable, frozen, codes):
        model = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(param_dtype), trainable), frozen)
        total, text, audio = objective(model_terms(model, codes, text_padding_weight=text_padding_weight,
                                                   first_codebook_weight_multiplier=first_codebook_weight_multiplier))
        return total, {"text_loss": text, "audio_loss": audio}

    return loss_fn


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, num_microbatches: int,
                    hold_frozen=None):
    """step(state, frozen, codes) -> (state, metrics) on a `TrainState`.

    hold_frozen: shardings (a tree like `frozen`) the step moves the frozen weights to once, before
    any pass, and holds them in (config `frozen_weights=gather_once`: one all-gather per step).

    With num_microbatches n the batch is split in n and gradients are averaged, as
    moshi-finetune does (each microbatch's loss is a mean over its own tokens). metrics["all_finite"]
    says whether the loss, the gradient norm and every updated parameter are finite: the loop never
    saves a step without it (one fused reduction, so the check costs next to nothing).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, frozen, codes):
        params = state.params
        if hold_frozen is not None:
            frozen = jax.lax.with_sharding_constraint(frozen, hold_frozen)
        if num_microbatches == 1:
            (loss, aux), grads = grad_fn(params, frozen, codes)
        else:
            micro = codes.reshape(num_microbatches, codes.shape[0] // num_microbatches, *codes.shape[1:])
            micro = constrain(micro, (None, "batch", None, None))  # each microbatch on every device

            def accumulate(carry, batch):
                (loss, aux), grads = grad_fn(params, frozen, batch)
                return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

            zeros = (jnp.zeros(()), {"text_loss": jnp.zeros(()), "audio_loss": jnp.zeros(())},
                     jax.tree.map(jnp.zeros_like, params))
            (loss, aux, grads), _ = jax.lax.scan(accumulate, zeros, micro)
            loss, aux, grads = jax.tree.map(lambda x: x / num_microbatches, (loss, aux, grads))
        new_state = state.apply(grads, optimizer)
        grad_norm = optax.global_norm(grads)
        finite = all_finite((loss, grad_norm, new_state.params))
        return new_state, {"loss": loss, "grad_norm": grad_norm, "all_finite": finite, **aux}

    return step
