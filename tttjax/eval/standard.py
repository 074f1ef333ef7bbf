"""Standard metrics of a checkpoint on a prepared dataset or a codes.npy array (DESIGN.md section 8).

A `codes.npy` [N, 17, T] is evaluated row by row as given (no cutting, no shuffling); the last
batch is filled with all -1 rows, which carry no loss. A dataset spec (prepared DATA_DIR,
synthetic:N, tfds:..., mixtures) goes through `make_dataset` / `make_eval_iterator`: every example
from its start, cut or -1-padded to `num_frames`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np

from tttjax.eval import memory
from tttjax.eval.metrics import accumulate, make_terms_fn, standard_metrics, with_counts


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
    from tttjax import data as data_lib

    dataset = data_lib.make_dataset(spec, num_frames=num_frames, card=cfg.card, text_card=cfg.text_card,
                                    n_q=cfg.n_q, seed=seed)
    if len(dataset) == 0:
        raise ValueError(f"--data={spec}: no examples")
    return data_lib.make_eval_iterator(dataset, batch_size=batch_size)


def evaluate(model, batches: Iterator[np.ndarray], *, text_padding_weight: float,
             first_codebook_weight_multiplier: float, max_batches: int = 0, check_memory: bool = True,
             progress=None) -> dict:
    """Token-weighted standard metrics of `model` over `batches` (numpy [B, 17, T])."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    cfg = model.cfg
    terms = make_terms_fn(cfg, text_padding_weight=text_padding_weight,
                          first_codebook_weight_multiplier=first_codebook_weight_multiplier)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, c: terms(nnx.merge(graphdef, s), c))
    compiled: dict[tuple, object] = {}
    sequences = frames = 0
    tic = time.perf_counter()

    def run() -> Iterator[dict]:
        nonlocal sequences, frames
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            shape = tuple(batch.shape)
            if shape not in compiled:
                lowered = fn.lower(state, jax.ShapeDtypeStruct(shape, jnp.int32))
                if check_memory:
                    memory.check_batch(cfg, shape[0], shape[2])
                compiled[shape] = lowered.compile()
                if check_memory:
                    memory.check_batch(cfg, shape[0], shape[2], compiled=compiled[shape])
            try:
                out = jax.device_get(compiled[shape](state, jnp.asarray(batch)))
            except Exception as e:  # XlaRuntimeError has no stable import path
                if memory.is_oom(e):
                    raise memory.BatchTooLarge(memory.oom_message(shape[0], shape[2])) from None
                raise
            real = np.any(batch != -1, axis=(1, 2))
            sequences += int(real.sum())
            frames += int(real.sum()) * shape[2]
            if progress is not None:
                progress(1)
            yield out

    total = accumulate(run())
    metrics = with_counts(standard_metrics(total), total)
    elapsed = time.perf_counter() - tic
    metrics["num_sequences"] = float(sequences)
    metrics["frames_per_s"] = frames / max(elapsed, 1e-9)
    return metrics


def load_codes_file(path: str | Path, cfg) -> np.ndarray:
    from tttjax.forward import load_codes
    from tttjax.model.moshi import initial_tokens

    return load_codes(path, initial_tokens(cfg))  # each stream's initial token = its vocab size
