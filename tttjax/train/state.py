"""The run's starting weights and the fingerprint of its frozen base.

The model's parameters are split by path into `trainable` (LoRA + TTT + gates, or everything
for full fine-tuning) and `frozen`. Trainable parameters live in fp32 (master copies, and so the
optimizer state is fp32) and are cast to `param_dtype` for the forward pass; frozen ones stay in
`param_dtype` and are never checkpointed by the train state (they are re-derived from
`moshi_paths` / the seed, and their fingerprint is checked on resume).
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion.sources import copy_into
from tttjax.model.params import init_model, is_adapter, trainable_filter
from tttjax.parallel.sharding import frozen_storage_drop
from tttjax.weights import open_weights


def initial_weights(program) -> tuple[dict, dict]:
    """(fp32 master trainables, frozen params) of the run's starting model, born on the mesh: random
    init (seed), then the base weights of moshi_paths if set, streamed straight onto the mesh."""
    config = program.config
    model = init_model(program.cfg, program.mesh, config.seed, full_finetuning=program.full_finetuning,
                       frozen_drop=frozen_storage_drop(config.frozen_weights))
    base = config.moshi_paths.moshi_path
    if base:
        copy_into(model, open_weights(base, config.moshi_paths.config_path or None).source,
                  source_name=f"moshi_paths.moshi_path={base}", allow_missing=is_adapter)
    _, trainable, frozen = nnx.split(model, trainable_filter(program.full_finetuning), ...)
    masters = jax.tree.map(lambda x: x.astype(jnp.float32), nnx.to_pure_dict(trainable))
    return masters, nnx.to_pure_dict(frozen)


def fingerprint(frozen) -> dict:
    """A cheap description of the frozen params (paths, shapes, dtypes, sums) to detect a changed base.

    Sums are compared with a tolerance (`same_fingerprint`), since a different mesh reduces in a
    different order.
    """
    leaves = jax.tree_util.tree_flatten_with_path(frozen)[0]
    sums = jax.jit(lambda xs: [jnp.stack([jnp.sum(x.astype(jnp.float32)),
                                          jnp.sum(jnp.abs(x.astype(jnp.float32)))]) for x in xs])(
        [x for _, x in leaves])
    digest = hashlib.sha256()
    for path, x in leaves:
        digest.update(f"{jax.tree_util.keystr(path)}{x.shape}{x.dtype}".encode())
    totals = np.sum([np.asarray(s, np.float64) for s in sums], axis=0) if sums else np.zeros(2)
    return {"layout": digest.hexdigest()[:16], "sum": float(totals[0]), "abs_sum": float(totals[1])}


def same_fingerprint(saved: dict, current: dict, rtol: float = 1e-5) -> bool:
    return saved["layout"] == current["layout"] and all(
        abs(saved[k] - current[k]) <= rtol * max(abs(current[k]), 1e-12) for k in ("sum", "abs_sum"))
