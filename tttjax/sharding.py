"""Device mesh (data, fsdp, tensor), logical axis rules, shardings, multi-host init, memory estimate.

Parameters carry logical axis names (`out_sharding` metadata); `LOGICAL_RULES` maps each name to
mesh axes. Every parameter must carry names and every name must have a rule: `state_shardings`
refuses a parameter without them, so a new weight cannot silently end up replicated.

Mesh (docs/distributed.md): `mesh.data`, `mesh.fsdp`, `mesh.tensor` give the axis sizes (-1 = the
remaining devices). With `mesh.dcn_*` left at 1 they span all devices. Multi-slice TPU (and GPU
clusters, one granule per process) split each axis into a fast inner part (ICI: `mesh.data` ...,
per slice) and an outer part over the data-centre network (`mesh.dcn_data` ..., -1 = the remaining
slices); the axis size is their product (MaxText's ici_* / dcn_* parallelism).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

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

# ----------------------------------------------------------------------------------------------
# Mesh


def _resolve(sizes: list[int], total: int, what: str) -> tuple[int, ...]:
    named = dict(zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {what} {named}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {what} {named}: sizes must be >= 1 or -1")
    known = math.prod(s for s in sizes if s != -1)
    if total % known:
        raise ValueError(f"mesh {what} {named} does not fit {total}")
    sizes = [total // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != total:
        raise ValueError(f"mesh {what} {named} uses {math.prod(sizes)} of {total}")
    return tuple(sizes)


def resolve_mesh(spec: Mapping, num_devices: int, num_granules: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ici_shape, dcn_shape) of `mesh.{data,fsdp,tensor}` and `mesh.dcn_*` (-1 = the rest).

    With every dcn size 1, the ICI shape spans all `num_devices` (granules are ignored);
    otherwise the dcn shape spans the `num_granules` slices (or processes) and the ICI shape the
    devices of one of them.
    """
    dcn = [int(spec.get(f"dcn_{axis}", 1)) for axis in MESH_AXES]
    ici = [int(spec.get(axis, 1)) for axis in MESH_AXES]
    if all(s == 1 for s in dcn):
        return _resolve(ici, num_devices, "devices"), (1, 1, 1)
    if num_devices % num_granules:
        raise ValueError(f"{num_devices} devices do not split evenly over {num_granules} slices/processes")
    return (_resolve(ici, num_devices // num_granules, f"per slice ({num_devices // num_granules} devices)"),
            _resolve(dcn, num_granules, f"dcn ({num_granules} slices/processes)"))


def mesh_shape(spec: Mapping, num_devices: int, num_granules: int = 1) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) sizes `spec` resolves to (ICI x DCN)."""
    ici, dcn = resolve_mesh(spec, num_devices, num_granules)
    return tuple(i * d for i, d in zip(ici, dcn))


def _granules(devices) -> tuple[int, bool]:
    """(number of slices or processes, whether the granule is the process)."""
    if devices[0].platform == "tpu":
        slices = {getattr(d, "slice_index", 0) for d in devices}
        return len(slices), False
    return len({d.process_index for d in devices}), True


def make_mesh(spec: Mapping, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh of `spec` over `devices` (default: all), axes of type Auto."""
    from jax.experimental import mesh_utils

    devices = list(jax.devices() if devices is None else devices)
    num_granules, process_granule = _granules(devices)
    ici, dcn = resolve_mesh(spec, len(devices), num_granules)
    if math.prod(dcn) > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=process_granule)
    else:
        if num_granules > 1 and not process_granule and ici[1] * ici[2] > len(devices) // num_granules:
            log.warning("mesh %s: fsdp/tensor span %d TPU slices over DCN; set mesh.dcn_data=-1 to keep "
                        "them inside a slice", dict(zip(MESH_AXES, ici)), num_granules)
        if devices[0].platform == "tpu":  # physical-topology-aware order (ICI rings)
            grid = mesh_utils.create_device_mesh(ici, devices)
        else:  # process-major order: each process holds a contiguous block of every axis
            grid = np.asarray(devices).reshape(ici)
    return Mesh(grid, MESH_AXES)


# ----------------------------------------------------------------------------------------------
# Logical names -> PartitionSpecs -> shardings


def logical_to_spec(names) -> PartitionSpec:
    rules = dict(LOGICAL_RULES)
    unknown = [n for n in names if n is not None and n not in rules]
    if unknown:
        raise KeyError(f"logical axes {unknown} have no sharding rule in tttjax.sharding.LOGICAL_RULES")
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


def _names(variable, path) -> tuple:
    names = variable.get_metadata().get("out_sharding")
    where = ".".join(str(getattr(k, "key", k)) for k in path)
    if names is None:
        if isinstance(variable, nnx.Param) or variable.ndim > 0:
            raise ValueError(f"parameter {where} {tuple(variable.shape)} has no sharding annotation: create it "
                             f"with out_sharding=(logical names) (nnx.Param(..., out_sharding=...) or "
                             f"nnx.with_partitioning); see tttjax.sharding.LOGICAL_RULES")
        return ()
    if len(names) != variable.ndim:
        raise ValueError(f"parameter {where}: sharding names {names} do not match shape {tuple(variable.shape)}")
    return tuple(names)


def param_specs(state, axis_sizes: Mapping[str, int]):
    """PartitionSpecs for an nnx.State of Variables on a mesh of `axis_sizes` (no devices needed)."""
    def one(path, variable):
        return fit_spec(logical_to_spec(_names(variable, path)), variable.shape, axis_sizes)

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state, mesh: Mesh):
    """NamedShardings for an nnx.State of Variables, from their `out_sharding` logical names.

    A parameter without names, or with a name that has no rule, is an error naming it.
    """
    specs = param_specs(state, dict(mesh.shape))
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
        raise ValueError(f"batch_size={batch_size} / num_microbatches={num_microbatches} = {micro} sequences per "
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
        raise ValueError(f"mesh {dict(mesh.shape)}: processes hold overlapping batch rows; cannot split the "
                         f"batch of {global_batch_size} by process")
    return row_sets.index(mine), count


def global_batch(mesh: Mesh, local: np.ndarray, global_batch_size: int) -> jax.Array:
    """The global codes array from this process's rows (`process_batch_slice`)."""
    local = np.asarray(local, np.int32)
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local,
                                                  (global_batch_size,) + local.shape[1:])


# ----------------------------------------------------------------------------------------------
# Activations


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
    import functools

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    return wrapped


# ----------------------------------------------------------------------------------------------
# Multi-host


def initialize_distributed() -> None:
    """Start JAX's distributed runtime, always (one process too: Orbax's preemption notice needs it).

    In order:
    * explicit: JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID, optional
      JAX_LOCAL_DEVICE_IDS "0,1"), as launch/local.py and launch/slurm.py set them; cluster
      auto-detection is switched off so SLURM's per-task GPU binding does not override them;
    * a cluster JAX detects itself: Cloud TPU VMs / pods (metadata server), GKE, SLURM (srun),
      Open MPI; under srun with one task per node every local GPU stays visible;
    * otherwise one local process on a free localhost port (skipped, with a warning, when JAX is
      already in use in this process: then SIGTERM cannot trigger a preemption checkpoint).
    JAX_INITIALIZATION_TIMEOUT (seconds, default 300) bounds the wait for the other processes.
    CPU processes exchange collectives over gloo.
    """
    import socket

    if jax.distributed.is_initialized():
        return
    env = os.environ
    timeout = int(env.get("JAX_INITIALIZATION_TIMEOUT", "300"))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if env.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env.get("JAX_NUM_PROCESSES", "1")),
                                   process_id=int(env.get("JAX_PROCESS_ID", "0")),
                                   cluster_detection_method="deactivate", initialization_timeout=timeout)
        return
    cluster = _detected_cluster()
    if cluster is not None:
        kwargs = {}
        one_task_per_node = _slurm_tasks_per_node() == 1 and not env.get("JAX_LOCAL_DEVICE_IDS")
        if cluster.__name__ == "SlurmCluster" and one_task_per_node:
            # JAX binds task i to GPU SLURM_LOCALID; one task per node must see all of them.
            kwargs = dict(coordinator_address=cluster.get_coordinator_address(timeout, env.get("JAX_COORDINATOR_PORT")),
                          num_processes=cluster.get_process_count(), process_id=cluster.get_process_id(),
                          cluster_detection_method="deactivate")
        log.info("jax.distributed: %s detected", cluster.__name__)
        jax.distributed.initialize(initialization_timeout=timeout, **kwargs)
        return
    if _backend_in_use():  # JAX already in use in this process (tests, notebooks)
        log.warning("jax.distributed not started: JAX's backend is already initialised; a SIGTERM will stop "
                    "this process without a preemption checkpoint")
        return
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    jax.distributed.initialize(f"localhost:{port}", num_processes=1, process_id=0,
                               cluster_detection_method="deactivate", initialization_timeout=timeout)


def _backend_in_use() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: assume not, initialize() will say
        return False


def _detected_cluster():
    """The cluster environment `jax.distributed.initialize()` would auto-detect, or None."""
    try:
        from jax._src import clusters
    except ImportError:  # private module moved: fall back to env hints
        hints = ("SLURM_STEP_NODELIST", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                 "OMPI_MCA_orte_hnp_uri")
        return type("EnvCluster", (), {}) if any(h in os.environ for h in hints) else None
    for cluster in clusters.ClusterEnv._cluster_types:
        if getattr(cluster, "opt_in_only_method", False):
            continue
        try:
            if cluster.is_env_present():
                return cluster
        except Exception:  # a probe (e.g. a metadata query) failed: not that cluster
            continue
    return None


def _slurm_tasks_per_node() -> int:
    value = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_NTASKS_PER_NODE") or "0"
    try:
        return int(value.split("(")[0].split(",")[0])
    except ValueError:
        return 0


# ----------------------------------------------------------------------------------------------
# Per-device memory estimate (docs/distributed.md, bench/memory_estimate.py)

GiB = 1024 ** 3
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass
class MemoryEstimate:
    """Per-device bytes of a training step, by component (an estimate, not XLA's exact plan)."""

    frozen_params: int  # frozen weights in param_dtype, sharded
    trainable_state: int  # fp32 masters + Adam mu/nu + fp32 grads + param_dtype copy, sharded
    gathered_weights: int  # FSDP all-gathered weights of ~2 layers in flight
    saved_activations: int  # what the backward pass keeps (depends on remat)
    layer_workspace: int  # one layer's full activations while it is (re)computed
    logits: int  # text + audio logits, log-softmax and their gradients (fp32)
    margin: int  # XLA temporaries, fragmentation, what the formulas miss: 15% of the above

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))

    def table(self) -> str:
        rows = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)] + [("total", self.total)]
        return "\n".join(f"  {name:<18} {value / GiB:8.2f} GiB" for name, value in rows)


def _shards(spec: PartitionSpec, axis_sizes: Mapping[str, int], skip: tuple[str, ...] = ()) -> int:
    """Into how many pieces `spec` splits an array (mesh axes in `skip` not counted)."""
    axes = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
    return math.prod(axis_sizes[a] for a in axes if a not in skip)


def _per_device_param_bytes(cfg, axis_sizes: Mapping[str, int], trainable) -> tuple[int, int, int]:
    """(frozen bytes, trainable param count, bytes of the largest layer gathered over fsdp), per device."""
    from tttjax.model.moshi import abstract_model

    pbytes = _DTYPE_BYTES[cfg.param_dtype]
    frozen, train_count, layer_bytes = 0, 0, {}
    for path, variable in nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param)):
        spec = fit_spec(logical_to_spec(_names(variable, path)), variable.shape, axis_sizes)
        size = math.prod(variable.shape)
        keys = tuple(str(k) for k in path)
        if trainable(keys):
            train_count += size // _shards(spec, axis_sizes)
        else:
            frozen += size // _shards(spec, axis_sizes) * pbytes
        if keys[0] in ("transformer", "depformer", "ttt"):  # stacked: one layer, all-gathered over fsdp
            stack = "depformer" if keys[0] == "depformer" else "transformer"
            one_layer = size // variable.shape[0] // _shards(spec, axis_sizes, skip=("fsdp",))
            layer_bytes[stack] = layer_bytes.get(stack, 0) + one_layer * pbytes
    return frozen, train_count, max(layer_bytes.values(), default=0)


def estimate_memory(cfg, *, batch_size: int, num_microbatches: int, num_frames: int,
                    full_finetuning: bool, mesh_axes: Mapping[str, int]) -> MemoryEstimate:
    """Per-device memory of a training step of model `cfg` on a mesh of `mesh_axes` sizes.

    Parameters and optimizer state come from the real parameter shapes and sharding rules;
    activations from a per-layer count of what the forward pass materialises (bytes per token),
    times what the remat policy keeps. See docs/distributed.md for the formulas and their limits.
    """
    from tttjax.train.state import trainable_filter

    act = _DTYPE_BYTES[cfg.dtype]
    pbytes = _DTYPE_BYTES[cfg.param_dtype]
    keep = trainable_filter(full_finetuning)
    frozen, train_count, layer_gathered = _per_device_param_bytes(cfg, mesh_axes, lambda p: keep(p, None))
    # fp32 master + Adam mu + nu + fp32 grads (+ their accumulator with microbatches) + the cast copy
    trainable_state = train_count * (4 + 8 + 4 + (4 if num_microbatches > 1 else 0) + pbytes)

    tp = mesh_axes["tensor"]
    b = max(1, batch_size // num_microbatches // batch_parallelism(mesh_axes))  # sequences per device
    T, D, H, L = num_frames, cfg.dim, cfg.num_heads, cfg.num_layers
    hid, r = cfg.hidden, cfg.lora_rank
    S, dd, Hd, Ld, hid_d = cfg.dep_q, cfg.depformer_dim, cfg.depformer_num_heads, cfg.depformer_num_layers, \
        cfg.depformer_hidden

    def layer_full(dim, heads, hidden, length, ctx_len):
        """Bytes per token of one layer's forward (everything autodiff would keep without remat)."""
        return (act * (dim * 10 + 3 * dim // tp + 4 * hidden // tp + 8 * r)  # norms, qkv, attn, mlp, lora
                + 4 * 4 * dim  # fp32 norms and rope temporaries
                + (4 + 4 + act) * heads // tp * min(length, ctx_len))  # scores, softmax (fp32), probs

    def layer_dots(dim, hidden):
        """Bytes per token kept by the `dots` policy: outputs of the weight matmuls."""
        return act * (3 * dim // tp + dim + 2 * hidden // tp + dim + 8 * r)

    temporal_full = layer_full(D, H, hid, T, cfg.context or T)
    depformer_full = S * layer_full(dd, Hd, hid_d, S, cfg.depformer_context or S)
    ttt_extra = 0
    if cfg.ttt_layers:  # TTT branch: q/k/v/lr and their gradients (fp32), inner-state checkpoints per group
        Ht, d = cfg.ttt_heads, D // cfg.ttt_heads
        groups = math.ceil(math.ceil(T / cfg.ttt_mini_batch_size) / cfg.ttt_scan_remat_group)
        ttt_extra = 2 * (4 * (8 * D + Ht) * T + 4 * groups * Ht * (8 * d * d + 5 * d))  # per sequence
    n_ttt = len(cfg.ttt_layers)
    # The layers hosting a TTT branch run outside the layer scan; measured against XLA's buffer
    # assignment, their activations stay live whatever the remat policy, so they count in full.
    ttt_layers = b * n_ttt * (T * temporal_full + ttt_extra)
    if cfg.remat == "none":
        saved = b * T * ((L - n_ttt) * temporal_full + Ld * depformer_full) + ttt_layers
        workspace = 0
    elif cfg.remat == "dots":
        saved = b * T * ((L - n_ttt) * (layer_dots(D, hid) + act * D) + Ld * S * (layer_dots(dd, hid_d) + act * dd))
        saved += ttt_layers
        workspace = b * T * max(temporal_full, depformer_full)
    else:  # full: only each scanned layer's input survives
        saved = b * T * act * ((L - n_ttt) * D + Ld * S * dd) + ttt_layers
        workspace = b * T * max(temporal_full, depformer_full)
    # fp32 logits, their log-softmax and gradient, text and dep_q audio heads
    logits = b * T * 4 * 3 * (cfg.text_card + S * cfg.card) // tp
    gathered = 2 * layer_gathered if mesh_axes["fsdp"] > 1 else 0
    parts = dict(frozen_params=frozen, trainable_state=trainable_state, gathered_weights=gathered,
                 saved_activations=saved, layer_workspace=workspace, logits=logits)
    return MemoryEstimate(**{k: int(v) for k, v in parts.items()}, margin=int(0.15 * sum(parts.values())))


def device_memory_bytes(device=None) -> int | None:
    """The accelerator's memory limit (None where unknown, e.g. CPU)."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:
        return None
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def check_memory(estimate: MemoryEstimate, capacity: int | None, *, mode: str, what: str) -> str | None:
    """Compare the estimate with device memory: raise (mode "error") or warn when it does not fit.

    Returns the warning text, if any. mode: "error" | "warn" | "off".
    """
    if mode not in ("error", "warn", "off"):
        raise ValueError(f"memory_check={mode!r}: expected error, warn or off")
    if mode == "off" or capacity is None:
        return None
    text = (f"estimated per-device memory for {what}: {estimate.total / GiB:.1f} GiB of "
            f"{capacity / GiB:.1f} GiB\n{estimate.table()}")
    advice = ("raise mesh.fsdp (shards params and optimizer state), use remat=full, raise num_microbatches "
              "or lower batch_size / duration_sec")
    if estimate.total > capacity:
        text += f"\nthe estimate exceeds device memory: {advice}"
        if mode == "error":
            raise ValueError(f"{text} (memory_check=warn runs anyway)")
        log.warning("%s", text)
        return text
    if estimate.total > 0.9 * capacity:
        text += "\nwithin 10% of device memory"
        log.warning("%s", text)
        return text
    log.info("%s", text)
    return None
