"""Standard metrics of a checkpoint on a prepared dataset or a codes.npy array (docs/contract.md §8).

A `codes.npy` [N, 17, T] is evaluated row by row as given (no cutting, no shuffling); the last
batch is filled with all -1 rows, which carry no loss. A dataset spec (prepared DATA_DIR,
synthetic:N, tfds:..., mixtures) goes through `make_dataset` / `make_eval_iterator`: every example
from its start, cut or -1-padded to `num_frames`.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tttjax import data as data_lib
from tttjax.analysis import fit
from tttjax.data.streams import NO_TOKEN
from tttjax.errors import UserError
from tttjax.eval.metrics import accumulate, standard_metrics, with_counts
from tttjax.objective import model_terms
from tttjax.parallel.sharding import batch_sharding, replicated


def is_codes_file(spec: str) -> bool:
    return spec.endswith(".npy")


def codes_batches(codes: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """[batch_size, K, T] int32 slices of codes; the last one padded with -1 rows."""
    for start in range(0, codes.shape[0], batch_size):
        batch = codes[start:start + batch_size]
        if batch.shape[0] < batch_size:
            pad = np.full((batch_size - batch.shape[0],) + codes.shape[1:], -1, np.int32)
            batch = np.concatenate([batch, pad])
        yield np.asarray(batch, np.int32)


def dataset_batches(spec: str, cfg, *, num_frames: int, batch_size: int, seed: int = 0) -> Iterator[np.ndarray]:
    dataset = data_lib.make_dataset(spec, num_frames=num_frames, card=cfg.card, text_card=cfg.text_card,
                                    n_q=cfg.n_q, seed=seed)
    if len(dataset) == 0:
        raise UserError(f"--data={spec}: no examples")
    return data_lib.make_eval_iterator(dataset, batch_size=batch_size)


class Evaluator:
    """Token-weighted standard metrics of a model over batches of codes [B, 17, T].

    One compiled program per batch shape, kept across calls (the trainer evaluates every
    eval_freq steps). `mesh`: the trainer's, whose global batches arrive batch-sharded; with
    `check_memory` (the CLI) a batch that would not fit is refused before it runs.
    """

    def __init__(self, *, text_padding_weight: float, first_codebook_weight_multiplier: float, mesh=None,
                 check_memory: bool = False):
        self.weights = dict(text_padding_weight=text_padding_weight,
                            first_codebook_weight_multiplier=first_codebook_weight_multiplier)
        self.mesh, self.check_memory = mesh, check_memory

        def terms(graphdef, state, codes):
            out = model_terms(nnx.merge(graphdef, state), codes, **self.weights)
            out["sequences"] = jnp.sum(jnp.any(codes != NO_TOKEN, axis=(1, 2))).astype(jnp.float32)
            return out

        self._terms = jax.jit(terms, static_argnums=0, out_shardings=None if mesh is None else replicated(mesh))
        self._compiled: dict[tuple, object] = {}

    def lower(self, model, shape: tuple):
        """The metrics program for [B, 17, T] codes of `shape`, lowered (the model may be abstract)."""
        graphdef, state = nnx.split(model)
        sharding = None if self.mesh is None else batch_sharding(self.mesh)
        with contextlib.ExitStack() as stack:
            if self.mesh is not None:
                stack.enter_context(jax.set_mesh(self.mesh))
            return self._terms.lower(graphdef, state, jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding))

    def _program(self, model, graphdef, shape: tuple):
        key = (graphdef, shape)
        if key not in self._compiled:
            lowered = self.lower(model, shape)
            if self.check_memory:
                fit.check_batch(model.cfg, shape[0], shape[2])
            compiled, refused = fit.compile_program(lowered.compile)
            if refused is not None:
                raise fit.BatchTooLarge(fit.batch_oom_message(shape[0], shape[2]))
            self._compiled[key] = compiled
            if self.check_memory:
                fit.check_batch(model.cfg, shape[0], shape[2], compiled=compiled)
        return self._compiled[key]

    def __call__(self, model, batches: Iterable, *, max_batches: int = 0, progress=None) -> dict:
        graphdef, state = nnx.split(model)
        tic = time.perf_counter()
        frames = 0

        def run() -> Iterator[dict]:
            nonlocal frames
            for batch in itertools.islice(batches, max_batches or None):
                shape = tuple(batch.shape)
                program = self._program(model, graphdef, shape)
                try:
                    out = jax.device_get(program(state, jnp.asarray(batch, jnp.int32)))
                except jax.errors.JaxRuntimeError as e:
                    fit.raise_if_oom(e, fit.BatchTooLarge(fit.batch_oom_message(shape[0], shape[2])))
                    raise
                frames += int(out["sequences"]) * shape[2]
                if progress is not None:
                    progress(1)
                yield out

        total = accumulate(run())
        sequences = float(total.pop("sequences"))
        metrics = with_counts(standard_metrics(total), total)
        metrics["num_sequences"] = sequences
        metrics["frames_per_s"] = frames / max(time.perf_counter() - tic, 1e-9)
        return metrics
