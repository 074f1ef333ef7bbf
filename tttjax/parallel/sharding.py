"""Logical axis rules, the shardings of params, optimizer state and batches, activation constraints.

Parameters carry logical axis names (`out_sharding` metadata); `LOGICAL_RULES` maps each name to
mesh axes. Every parameter must carry names and every name must have a rule: `state_shardings`
refuses a parameter without them, so a new weight cannot silently end up replicated.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tttjax.config.schema import FROZEN_PLACEMENTS
from tttjax.errors import UserError
from tttjax.parallel.mesh import MESH_AXES

# logical axis -> mesh axes (None = replicated). FSDP shards the model dim of every weight;
# tensor parallelism shards heads / MLP hidden / vocab (an axis that does not divide a dim is
# dropped for that dim, see `fit_spec`). Activations: `batch` over data and fsdp, rest replicated.
LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),  # activations and the codes batch
    ("layers", None),  # stacked (scanned) layer axis
    ("depth_steps", None),  # depformer per-codebook-step weights
    ("embed", "fsdp"),  # model dim of every weight (temporal and depformer)
    ("dep_embed", "tensor"),  # depformer_in output (the depformer dim)
    ("heads", "tensor"),  # attention q/k/v/out features, TTT wq/wk/wv/wo
    ("mlp", "tensor"),  # SiLU-GLU hidden
    ("vocab", "tensor"),  # embeddings and output heads (text_card, card)
    ("lora_rank", "fsdp"),  # LoRA A/B: the rank dim takes fsdp where the other dim does not
    ("norm", None),  # RMSNorm alphas
    ("ttt_heads", "tensor"),  # TTT inner-model heads
    ("ttt_head_dim", None),
    ("ttt_hidden", None),
)


def frozen_storage_drop(placement: str) -> tuple[str, ...]:
    """The mesh axes frozen weights are not stored split over (`frozen_weights`: schema.FROZEN_PLACEMENTS)."""
    if placement not in FROZEN_PLACEMENTS:
        raise ValueError(f"frozen_weights={placement!r}: expected one of {', '.join(FROZEN_PLACEMENTS)}")
    return ("fsdp",) if placement == "replicated" else ()


def logical_to_spec(names) -> PartitionSpec:
    rules = dict(LOGICAL_RULES)
    unknown = [n for n in names if n is not None and n not in rules]
    if unknown:
        raise KeyError(f"logical axes {unknown} have no sharding rule in tttjax.parallel.sharding.LOGICAL_RULES")
    return PartitionSpec(*(None if n is None else rules[n] for n in names))


def fit_spec(spec: PartitionSpec, shape, axis_sizes: Mapping[str, int]) -> PartitionSpec:
    """Drop a mesh axis from a dim it does not divide (odd vocab sizes, small test models), and from
    a dim after the first that uses it (LoRA A [embed, lora_rank] both map to fsdp)."""
    out, used = [], set()
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = tuple(a for a in ((axes,) if isinstance(axes, str) else (axes or ())) if a not in used)
        size = math.prod(axis_sizes[a] for a in names)
        if names and dim % size == 0:
            used.update(names)
            out.append(names[0] if len(names) == 1 else names)
        else:
            out.append(None)
    while out and out[-1] is None:  # canonical form: equal specs compare equal
        out.pop()
    return PartitionSpec(*out)


def logical_names(variable, path) -> tuple:
    """The logical axis names of a parameter (its `out_sharding` metadata), checked against its shape."""
    names = variable.get_metadata().get("out_sharding")
    where = ".".join(str(getattr(k, "key", k)) for k in path)
    if names is None:
        if isinstance(variable, nnx.Param) or variable.ndim > 0:
            raise ValueError(f"parameter {where} {tuple(variable.shape)} has no sharding annotation: create it "
                             f"with out_sharding=(logical names) (nnx.Param(..., out_sharding=...) or "
                             f"nnx.with_partitioning); see tttjax.parallel.sharding.LOGICAL_RULES")
        return ()
    if len(names) != variable.ndim:
        raise ValueError(f"parameter {where}: sharding names {names} do not match shape {tuple(variable.shape)}")
    return tuple(names)


def without_axes(spec: PartitionSpec, axes: tuple[str, ...]) -> PartitionSpec:
    """`spec` with the mesh axes `axes` removed (those dims then replicated over them)."""
    out = []
    for entry in spec:
        names = tuple(a for a in ((entry,) if isinstance(entry, str) else (entry or ())) if a not in axes)
        out.append(None if not names else names[0] if len(names) == 1 else names)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def param_spec(variable, path, axis_sizes: Mapping[str, int], drop: tuple[str, ...] = ()) -> PartitionSpec:
    return without_axes(fit_spec(logical_to_spec(logical_names(variable, path)), variable.shape, axis_sizes), drop)


def param_specs(state, axis_sizes: Mapping[str, int], drop: tuple[str, ...] = ()):
    """PartitionSpecs for an nnx.State of Variables on a mesh of `axis_sizes` (no devices needed);
    mesh axes in `drop` are not used (a frozen base replicated over fsdp)."""
    return jax.tree_util.tree_map_with_path(lambda path, v: param_spec(v, path, axis_sizes, drop), state,
                                            is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state, mesh: Mesh, drop: tuple[str, ...] = ()):
    """NamedShardings for an nnx.State of Variables, from their `out_sharding` logical names
    (without the mesh axes in `drop`).

    A parameter without names, or with a name that has no rule, is an error naming it.
    """
    specs = param_specs(state, dict(mesh.shape), drop)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def opt_state_shardings(abstract_opt_state, params, mesh: Mesh):
    """Shardings of an optax state for `params` (a pytree of sharded arrays or ShapeDtypeStructs).

    A per-parameter slot (Adam mu / nu, also inside multi_transform's masked groups) is recognised
    by its trailing dict keys and shape matching a parameter, and gets that parameter's sharding;
    every other leaf (counts, injected hyper-parameters) is replicated.
    """
    def keys(path) -> tuple:
        out = []
        for k in reversed(path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            out.append(k.key)
        return tuple(reversed(out))

    by_path = {keys(path): x for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    rep = replicated(mesh)

    def one(path, leaf):
        param = by_path.get(keys(path))
        return param.sharding if param is not None and tuple(param.shape) == tuple(leaf.shape) else rep

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Codes [B, K, T]: the batch split over data and fsdp."""
    return NamedSharding(mesh, logical_to_spec(("batch", None, None)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_parallelism(mesh: Mesh | Mapping[str, int]) -> int:
    """How many ways the batch is split (data x fsdp)."""
    shape = mesh.shape if isinstance(mesh, Mesh) else mesh
    return int(shape["data"] * shape["fsdp"])


def check_batch(mesh: Mesh, batch_size: int, num_microbatches: int) -> None:
    """Every microbatch must split evenly over the batch-parallel devices."""
    ways = batch_parallelism(mesh)
    micro = batch_size // max(num_microbatches, 1)
    if micro % ways:
        raise UserError(f"batch_size={batch_size} / num_microbatches={num_microbatches} = {micro} sequences per "
                         f"microbatch is not divisible by mesh data x fsdp = {ways} "
                         f"(mesh {dict(mesh.shape)}); change batch_size or mesh.*")


def process_batch_slice(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
    """(index, count): this process feeds rows [index * B/count, (index+1) * B/count) of each global batch.

    Processes whose devices hold the same batch rows (the batch replicated across them, e.g. a
    tensor axis spanning hosts) load the same slice; `count` is the number of distinct slices.
    """
    sharding = batch_sharding(mesh)
    per_process: dict[int, set] = {}
    for device, index in sharding.devices_indices_map((global_batch_size, 1, 1)).items():
        rows = index[0].indices(global_batch_size)[:2]
        per_process.setdefault(device.process_index, set()).add(rows)
    row_sets = sorted({frozenset(r) for r in per_process.values()}, key=lambda s: min(s))
    count = len(row_sets)
    mine = frozenset(per_process[jax.process_index()])
    size = sum(stop - start for start, stop in mine)
    if count * size != global_batch_size:
        raise UserError(f"mesh {dict(mesh.shape)}: processes hold overlapping batch rows; cannot split the "
                         f"batch of {global_batch_size} by process")
    return row_sets.index(mine), count


def global_batch(mesh: Mesh, local: np.ndarray, global_batch_size: int) -> jax.Array:
    """The global codes array from this process's rows (`process_batch_slice`)."""
    local = np.asarray(local, np.int32)
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local,
                                                  (global_batch_size,) + local.shape[1:])


def constrain(x: jax.Array, names) -> jax.Array:
    """Sharding constraint on an activation by logical names, under the mesh of `jax.set_mesh`.

    A no-op without a mesh (single-device use, conversion, tests) and for axes that do not divide.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not all(a in mesh.axis_names for a in MESH_AXES):
        return x
    spec = fit_spec(logical_to_spec(names), x.shape, dict(zip(mesh.axis_names, mesh.axis_sizes)))
    return jax.lax.with_sharding_constraint(x, spec)


def under_mesh(mesh: Mesh, fn):
    """`fn` called under `jax.set_mesh(mesh)`, so `constrain` sees the mesh when `fn` is traced."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    return wrapped
