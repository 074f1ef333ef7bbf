"""Device mesh (data, fsdp, tensor), logical axis rules, and shardings for params and batches.

Parameters carry logical axis names (`out_sharding` metadata); `LOGICAL_RULES` maps each name to
mesh axes. Every logical name used by the model must appear here (tests check it), so a new
parameter cannot silently end up replicated by omission.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (None = replicated). FSDP shards the model dim of every weight;
# tensor parallelism shards heads / MLP hidden / vocab.
LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("depth_steps", None),
    ("embed", "fsdp"),
    ("dep_embed", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("lora_rank", None),
    ("norm", None),
    ("ttt_heads", "tensor"),
    ("ttt_head_dim", None),
    ("ttt_hidden", None),
)


def mesh_shape(spec: dict, num_devices: int) -> tuple[int, int, int]:
    """Resolve `mesh.{data,fsdp,tensor}` (-1 = the remaining devices) against the device count."""
    sizes = [int(spec.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not fit {num_devices} devices")
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} of {num_devices} devices")
    return tuple(sizes)


def make_mesh(spec: dict, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(spec, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(names) -> PartitionSpec:
    rules = dict(LOGICAL_RULES)
    unknown = [n for n in names if n is not None and n not in rules]
    if unknown:
        raise KeyError(f"logical axes {unknown} have no sharding rule in tttjax.sharding.LOGICAL_RULES")
    return PartitionSpec(*(None if n is None else rules[n] for n in names))


def _fit(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
    """Drop a mesh axis from a dim it does not divide (small test models on big meshes)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else (axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if size and dim % size == 0 else None)
    return PartitionSpec(*out)


def state_shardings(state, mesh: Mesh):
    """NamedShardings for an nnx.State of Variables, from their `out_sharding` logical names."""

    def one(variable):
        names = variable.get_metadata().get("out_sharding") or (None,) * variable.ndim
        if len(names) != variable.ndim:
            raise ValueError(f"sharding names {names} do not match shape {variable.shape}")
        return NamedSharding(mesh, _fit(logical_to_spec(names), variable.shape, mesh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Codes [B, K, T]: the batch split over data and fsdp."""
    return NamedSharding(mesh, logical_to_spec(("batch", None, None)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def initialize_distributed() -> None:
    """Start JAX's distributed runtime, always (one process too: Orbax's preemption notice needs it).

    Explicit: JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID. Cluster: SLURM and
    Cloud TPU are detected by `jax.distributed.initialize()` itself. Otherwise one local process
    on a free localhost port. CPU processes exchange collectives over gloo.
    """
    import os
    import socket

    if jax.distributed.is_initialized():
        return
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        num = int(env.get("JAX_NUM_PROCESSES", "1"))
        if num > 1:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], num_processes=num,
                                   process_id=int(env.get("JAX_PROCESS_ID", "0")))
    elif "SLURM_JOB_ID" in env or "TPU_WORKER_HOSTNAMES" in env or "CLOUD_TPU_TASK_ID" in env:
        jax.distributed.initialize()
    else:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        jax.distributed.initialize(f"localhost:{port}", num_processes=1, process_id=0)
