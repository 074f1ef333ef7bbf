"""Per-device memory: the one estimate of a step (training or forward-only), the device's memory,
and the checks that refuse what would not fit (docs/distributed.md, bench/memory_estimate.py).

The estimate counts parameters and optimizer state from the real parameter shapes and sharding
rules, and activations from a per-layer count of what the forward pass materialises (bytes per
token) times what the remat policy keeps. It is an estimate, not XLA's buffer assignment: where a
compiled program reports its own figures (`memory_analysis()` on TPU / GPU), those are exact.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Mapping

import jax
from jax.sharding import PartitionSpec

from tttjax.model.config import ModelConfig
from tttjax.model.params import flat_abstract, trainable
from tttjax.parallel.sharding import batch_parallelism, param_spec

log = logging.getLogger(__name__)

GiB = 1024 ** 3
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SINGLE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}


@dataclasses.dataclass
class MemoryEstimate:
    """Per-device bytes of a step, by component."""

    frozen_params: int  # frozen weights in param_dtype, sharded (every weight for a forward-only step)
    trainable_state: int  # fp32 masters + Adam mu/nu + fp32 grads + param_dtype copy, sharded
    gathered_weights: int  # FSDP all-gathered weights of ~2 layers in flight
    saved_activations: int  # what the backward pass keeps (depends on remat)
    layer_workspace: int  # one layer's full activations while it is (re)computed
    logits: int  # text + audio logits, log-softmax and their gradients (fp32)
    margin: int  # XLA temporaries, fragmentation, what the formulas miss: 15% of the above

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))

    @property
    def activations(self) -> int:
        """What grows with the batch: activations, workspace and logits, with their share of the margin."""
        return int((self.saved_activations + self.layer_workspace + self.logits) * 1.15)

    def table(self) -> str:
        rows = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)] + [("total", self.total)]
        return "\n".join(f"  {name:<18} {value / GiB:8.2f} GiB" for name, value in rows)


def _shards(spec: PartitionSpec, axis_sizes: Mapping[str, int], skip: tuple[str, ...] = ()) -> int:
    """Into how many pieces `spec` splits an array (mesh axes in `skip` not counted)."""
    axes = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
    return math.prod(axis_sizes[a] for a in axes if a not in skip)


def _per_device_param_bytes(cfg: ModelConfig, axis_sizes: Mapping[str, int], full_finetuning: bool,
                            training: bool) -> tuple[int, int, int]:
    """(frozen bytes, trainable param count, bytes of the largest layer gathered over fsdp), per device."""
    pbytes = _DTYPE_BYTES[cfg.param_dtype]
    frozen, train_count, layer_bytes = 0, 0, {}
    for path, variable in flat_abstract(cfg).items():
        spec = param_spec(variable, path, axis_sizes)
        size = math.prod(variable.shape)
        if training and trainable(path, full_finetuning):
            train_count += size // _shards(spec, axis_sizes)
        else:
            frozen += size // _shards(spec, axis_sizes) * pbytes
        if path[0] in ("transformer", "depformer", "ttt"):  # stacked: one layer, all-gathered over fsdp
            stack = "depformer" if path[0] == "depformer" else "transformer"
            one_layer = size // variable.shape[0] // _shards(spec, axis_sizes, skip=("fsdp",))
            layer_bytes[stack] = layer_bytes.get(stack, 0) + one_layer * pbytes
    return frozen, train_count, max(layer_bytes.values(), default=0)


def estimate_memory(cfg: ModelConfig, *, batch_size: int, num_frames: int, num_microbatches: int = 1,
                    full_finetuning: bool = False, mesh_axes: Mapping[str, int] = SINGLE_DEVICE,
                    training: bool = True) -> MemoryEstimate:
    """Per-device memory of a training step (or, `training=False`, of a forward pass: evaluation)
    of model `cfg` on a mesh of `mesh_axes` sizes. See docs/distributed.md for the formulas."""
    act = _DTYPE_BYTES[cfg.dtype]
    pbytes = _DTYPE_BYTES[cfg.param_dtype]
    frozen, train_count, layer_gathered = _per_device_param_bytes(cfg, mesh_axes, full_finetuning, training)
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
    workspace = b * T * max(temporal_full, depformer_full)
    ttt_extra = 0
    if cfg.ttt_layers:  # TTT branch: q/k/v/lr and their gradients (fp32), inner-state checkpoints per group
        Ht, d = cfg.ttt_heads, D // cfg.ttt_heads
        groups = math.ceil(math.ceil(T / cfg.ttt_mini_batch_size) / cfg.ttt_scan_remat_group)
        ttt_extra = 2 * (4 * (8 * D + Ht) * T + 4 * groups * Ht * (8 * d * d + 5 * d))  # per sequence
    n_ttt = len(cfg.ttt_layers)
    # The layers hosting a TTT branch run outside the layer scan; measured against XLA's buffer
    # assignment, their activations stay live whatever the remat policy, so they count in full.
    ttt_layers = b * n_ttt * (T * temporal_full + ttt_extra)
    if not training:
        saved = 0
    elif cfg.remat == "none":
        saved = b * T * ((L - n_ttt) * temporal_full + Ld * depformer_full) + ttt_layers
        workspace = 0
    elif cfg.remat == "dots":
        saved = b * T * ((L - n_ttt) * (layer_dots(D, hid) + act * D) + Ld * S * (layer_dots(dd, hid_d) + act * dd))
        saved += ttt_layers
    else:  # full: only each scanned layer's input survives
        saved = b * T * act * ((L - n_ttt) * D + Ld * S * dd) + ttt_layers
    # fp32 logits, their log-softmax and gradient, text and dep_q audio heads
    logits = b * T * 4 * 3 * (cfg.text_card + S * cfg.card) // tp
    gathered = 2 * layer_gathered if mesh_axes["fsdp"] > 1 else 0
    parts = dict(frozen_params=frozen, trainable_state=trainable_state, gathered_weights=gathered,
                 saved_activations=saved, layer_workspace=workspace, logits=logits)
    return MemoryEstimate(**{k: int(v) for k, v in parts.items()}, margin=int(0.15 * sum(parts.values())))


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
# Checks


def check_memory(estimate: MemoryEstimate, capacity: int | None, *, mode: str, what: str,
                 where: str = "device memory") -> str | None:
    """Training start-up: compare the estimate with `capacity` bytes of `where`; raise (mode "error",
    one line; the table goes to the log) or warn when it does not fit. Returns the warning text, if
    any. mode: "error" | "warn" | "off"."""
    if mode not in ("error", "warn", "off"):
        raise ValueError(f"memory_check={mode!r}: expected error, warn or off")
    if mode == "off" or capacity is None:
        return None
    text = (f"estimated per-device memory for {what}: {estimate.total / GiB:.1f} GiB of "
            f"{capacity / GiB:.1f} GiB of {where}\n{estimate.table()}")
    advice = ("lower batch_size / duration_sec, use remat=full, raise num_microbatches or mesh.fsdp (shards params "
              "and optimizer state)")
    if estimate.total > capacity:
        text += f"\nthe estimate exceeds {where}: {advice}"
        if mode == "error":
            log.info("%s", text)
            raise ValueError(f"estimated per-device memory for {what}: {estimate.total / GiB:.1f} GiB exceeds "
                             f"{where} ({capacity / GiB:.1f} GiB): {advice} (memory_check=warn runs anyway)")
        log.warning("%s", text)
        return text
    if estimate.total > 0.9 * capacity:
        text += "\nwithin 10% of device memory"
        log.warning("%s", text)
        return text
    log.info("%s", text)
    return None


class BatchTooLarge(ValueError):
    """--batch_size does not fit the device memory; the message says what would."""


def check_batch(cfg: ModelConfig, batch_size: int, frames: int, *, compiled=None, margin: float = 0.9) -> None:
    """Evaluation: raise BatchTooLarge if a [batch_size, 17, frames] forward would not fit the free memory.

    `compiled` (a jax Compiled) adds XLA's own temp-size figure where the backend reports one.
    """
    if batch_size < 1:
        raise BatchTooLarge(f"--batch_size={batch_size} must be >= 1")
    need = estimate_memory(cfg, batch_size=batch_size, num_frames=frames, training=False).activations
    if compiled is not None:
        try:
            stats = compiled.memory_analysis()
            need = max(need, int(stats.temp_size_in_bytes) + int(stats.output_size_in_bytes))
        except Exception:  # not every backend reports memory statistics
            pass
    free = free_bytes()
    if free is None or need <= margin * free:
        return
    per_row = max(1, need // batch_size)
    fits = int(margin * free // per_row)
    hint = f"try --batch_size={fits}" if fits >= 1 else "even --batch_size=1 does not fit; use a larger device"
    raise BatchTooLarge(f"--batch_size={batch_size} with {frames}-frame sequences needs about "
                        f"{need / GiB:.1f} GiB for activations and logits but only {free / GiB:.1f} GiB is free; "
                        f"{hint}")


def is_oom(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def oom_message(batch_size: int, frames: int) -> str:
    return (f"out of device memory evaluating --batch_size={batch_size} with {frames}-frame sequences; "
            f"lower --batch_size")
