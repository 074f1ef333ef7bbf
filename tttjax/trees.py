"""Checks over parameter trees that training and resuming share: are they finite, and is a frozen
base the one a checkpoint was trained on (its fingerprint)."""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np


def all_finite(tree) -> jax.Array:
    """Whether every value of `tree` is finite, as one boolean (cheap: one reduction per leaf), in
    one program: with several CPU processes, eager per-leaf collectives dispatched back to back may
    run concurrently and in another order on each process, and gloo then deadlocks."""
    return _all_finite(jax.tree.leaves(tree))


@jax.jit
def _all_finite(leaves) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


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


def abstract(tree, shardings=None, dtype=None):
    """ShapeDtypeStructs of a tree of arrays (or of ShapeDtypeStructs): a restore target, or the
    abstract input of a lowering; with their own shardings unless `shardings` (a matching tree)
    says, and their dtype unless `dtype` does."""
    if shardings is None:
        shardings = jax.tree.map(lambda x: x.sharding, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=s), tree, shardings)
