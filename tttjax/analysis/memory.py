"""Per-device memory: the one estimate of a step (training or forward-only), the device's memory and
a compiled program's own figures (docs/distributed.md, bench/memory_estimate.py); fit.py compares
them with capacity and refuses what would not fit.

The estimate counts parameters and optimizer state from the real parameter shapes and sharding
rules, and activations from a per-layer count of what the forward pass materialises (bytes per
token) times what the remat policy keeps. It is an estimate, not XLA's buffer assignment: where a
compiled program reports its own figures (`memory_analysis()` on TPU / GPU), those are exact.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping

import jax
from jax.sharding import PartitionSpec

from tttjax.model.attention import attention_band, resolve_impl
from tttjax.model.config import ModelConfig
from tttjax.model.params import flat_abstract, trainable
from tttjax.parallel.sharding import batch_parallelism, frozen_storage_drop, param_spec, without_axes


GiB = 1024 ** 3


def format_bytes(n: float) -> str:
    """GiB, or MiB below a tenth of one."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 2 ** 20:.1f} MiB"
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SINGLE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}
# What the formulas miss (XLA temporaries, fragmentation), as a share of their sum: set against
# XLA:TPU's buffer assignment of the 7B TTT step (docs/distributed.md, section 7).
MARGIN = 0.02


@dataclasses.dataclass
class MemoryEstimate:
    """Per-device bytes of a step, by component."""

    frozen_params: int  # frozen weights in param_dtype, sharded (every weight for a forward-only step)
    trainable_state: int  # fp32 masters + Adam mu/nu + fp32 grads + param_dtype copy, sharded
    gathered_weights: int  # FSDP all-gathered weights of ~2 layers in flight (+ the frozen base held by gather_once)
    saved_activations: int  # what the backward pass keeps (depends on remat)
    layer_workspace: int  # one layer's full activations while it is (re)computed
    logits: int  # text + audio logits and their gradients (fp32)
    margin: int  # XLA temporaries, fragmentation, what the formulas miss: MARGIN of the above

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))

    @property
    def activations(self) -> int:
        """What grows with the batch: activations, workspace and logits, with their share of the margin."""
        return int((self.saved_activations + self.layer_workspace + self.logits) * (1 + MARGIN))

    def table(self) -> str:
        rows = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)] + [("total", self.total)]
        return "\n".join(f"  {name:<18} {value / GiB:8.2f} GiB" for name, value in rows)


def _shards(spec: PartitionSpec, axis_sizes: Mapping[str, int], skip: tuple[str, ...] = ()) -> int:
    """Into how many pieces `spec` splits an array (mesh axes in `skip` not counted)."""
    axes = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
    return math.prod(axis_sizes[a] for a in axes if a not in skip)


def _per_device_param_bytes(cfg: ModelConfig, axis_sizes: Mapping[str, int], full_finetuning: bool,
                            training: bool, frozen_weights: str = "sharded") -> tuple[int, int, int, int]:
    """(frozen bytes stored, trainable param count, bytes of the largest layer gathered over fsdp at
    each use, frozen bytes a step holds gathered (gather_once)), per device."""
    pbytes = _DTYPE_BYTES[cfg.param_dtype]
    drop = frozen_storage_drop(frozen_weights)
    frozen, train_count, held, layer_bytes = 0, 0, 0, {}
    for path, variable in flat_abstract(cfg).items():
        spec = param_spec(variable, path, axis_sizes)
        size = math.prod(variable.shape)
        trains = trainable(path, full_finetuning)
        if training and trains:
            train_count += size // _shards(spec, axis_sizes)
        else:
            frozen += size // _shards(spec if trains else without_axes(spec, drop), axis_sizes) * pbytes
        holds = training and frozen_weights == "gather_once"
        if not trains and holds:
            held += size // _shards(spec, axis_sizes, skip=("fsdp",)) * pbytes
        if not trains and (holds or frozen_weights == "replicated"):
            continue  # held or replicated: not gathered layer by layer
        if path[0] in ("transformer", "depformer", "ttt"):  # stacked: one layer, all-gathered over fsdp
            stack = "depformer" if path[0] == "depformer" else "transformer"
            one_layer = size // variable.shape[0] // _shards(spec, axis_sizes, skip=("fsdp",))
            layer_bytes[stack] = layer_bytes.get(stack, 0) + one_layer * pbytes
    return frozen, train_count, max(layer_bytes.values(), default=0), held


def estimate_memory(cfg: ModelConfig, *, batch_size: int, num_frames: int, num_microbatches: int = 1,
                    full_finetuning: bool = False, mesh_axes: Mapping[str, int] = SINGLE_DEVICE,
                    training: bool = True, platform: str = "cpu", frozen_weights: str = "sharded") -> MemoryEstimate:
    """Per-device memory of a training step (or, `training=False`, of a forward pass: evaluation)
    of model `cfg` on a mesh of `mesh_axes` sizes, on `platform` (which attention `auto` picks).
    See docs/distributed.md for the formulas."""
    act = _DTYPE_BYTES[cfg.dtype]
    pbytes = _DTYPE_BYTES[cfg.param_dtype]
    frozen, train_count, layer_gathered, held = _per_device_param_bytes(cfg, mesh_axes, full_finetuning, training,
                                                                        frozen_weights)
    # fp32 master + Adam mu + nu + fp32 grads (+ their accumulator with microbatches) + the cast copy
    trainable_state = train_count * (4 + 8 + 4 + (4 if num_microbatches > 1 else 0) + pbytes)

    tp = mesh_axes["tensor"]
    b = max(1, batch_size // num_microbatches // batch_parallelism(mesh_axes))  # sequences per device
    T, D, H, L = num_frames, cfg.dim, cfg.num_heads, cfg.num_layers
    hid, r = cfg.hidden, cfg.lora_rank
    S, dd, Hd, Ld, hid_d = cfg.dep_q, cfg.depformer_dim, cfg.depformer_num_heads, cfg.depformer_num_layers, \
        cfg.depformer_hidden

    def layer_full(dim, heads, hidden, length, attention):
        """Bytes per token of one layer's forward (everything autodiff would keep without remat)."""
        return (act * (dim * 10 + 3 * dim // tp + 4 * hidden // tp + 8 * r)  # norms, qkv, attn, mlp, lora
                + 4 * 4 * dim  # fp32 norms and rope temporaries
                + heads // tp * attention_bytes(attention, length, cfg.context))

    def attention_bytes(impl, length, context):
        """Per token and head: xla's fp32 scores (softmax fused in) and probs over all T keys (the
        window is a mask), blockwise's over one key block at a time, a kernel's fp32 log-sum-exp."""
        if impl == "xla":
            return (4 + act) * length
        if impl == "blockwise":
            return (8 + act) * attention_band(length, context)[0]
        return 4

    temporal_impl = resolve_impl(cfg.attention_impl, platform, T, cfg.jnp_dtype)

    def layer_dots(dim, hidden):
        """Bytes per token kept by the `dots` policy: outputs of the weight matmuls."""
        return act * (3 * dim // tp + dim + 2 * hidden // tp + dim + 8 * r)

    temporal_full = layer_full(D, H, hid, T, temporal_impl)
    depformer_full = S * layer_full(dd, Hd, hid_d, S, "xla")
    workspace = b * T * max(temporal_full, depformer_full)
    ttt_extra = 0
    if cfg.ttt_layers:  # TTT branch: q/k/v/lr and their gradients (fp32), inner-state checkpoints per group
        Ht, d = cfg.ttt_heads, D // cfg.ttt_heads
        groups = math.ceil(math.ceil(T / cfg.ttt_mini_batch_size) / cfg.ttt_scan_remat_group)
        ttt_extra = 2 * (4 * (8 * D + Ht) * T + 4 * groups * Ht * (8 * d * d + 5 * d))  # per sequence
    n_ttt = len(cfg.ttt_layers)
    if not training:
        saved = 0
    elif cfg.remat == "none":
        saved = b * T * (L * temporal_full + Ld * depformer_full) + b * n_ttt * ttt_extra
        workspace = 0
    elif cfg.remat == "dots":
        saved = b * T * (L * (layer_dots(D, hid) + act * D) + Ld * S * (layer_dots(dd, hid_d) + act * dd))
    elif cfg.remat == "save_qkv":  # each layer's input and q/k/v projections (a TTT layer's three more)
        saved = b * T * act * (L * (D + 3 * D // tp) + Ld * S * (dd + 3 * dd // tp) + n_ttt * 3 * D // tp)
    else:  # full: only each layer's input survives (TTT layers are rematerialised like the scan's)
        saved = b * T * act * (L * D + Ld * S * dd)
    if workspace:  # the layer being (re)computed; a TTT layer adds its branch
        workspace += b * ttt_extra
    # fp32 logits and their gradient, text and dep_q audio heads (the log-softmax fuses into the loss)
    logits = b * T * 4 * 2 * (cfg.text_card + S * cfg.card) // tp
    gathered = (2 * layer_gathered + held) if mesh_axes["fsdp"] > 1 else 0
    parts = dict(frozen_params=frozen, trainable_state=trainable_state, gathered_weights=gathered,
                 saved_activations=saved, layer_workspace=workspace, logits=logits)
    return MemoryEstimate(**{k: int(v) for k, v in parts.items()}, margin=int(MARGIN * sum(parts.values())))


# ----------------------------------------------------------------------------------------------
# The device's memory


def _stats(device) -> dict:
    try:
        return device.memory_stats() or {}
    except Exception:  # some backends do not implement it
        return {}


def device_memory_bytes(device=None) -> int | None:
    """The accelerator's memory limit (None where unknown, e.g. CPU)."""
    stats = _stats(device or jax.local_devices()[0])
    return int(stats["bytes_limit"]) if stats.get("bytes_limit") else None


def free_bytes(device=None) -> int | None:
    """Free memory of a device: an accelerator's limit minus its use; on CPU the host's MemAvailable."""
    stats = _stats(device or jax.local_devices()[0])
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


# ----------------------------------------------------------------------------------------------
# A compiled program's figures (fit.py compares them with capacity)


def compiled_figures(compiled) -> dict | None:
    """Per-device bytes of a compiled program as its `memory_analysis()` reports them (None where the
    backend reports nothing). total = arguments + outputs + temporaries - what donation aliases."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    out = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
           "generated_code_bytes": int(m.generated_code_size_in_bytes)}
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out
