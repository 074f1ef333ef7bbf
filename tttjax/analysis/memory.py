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
import re
from typing import Mapping

import jax
from jax.sharding import PartitionSpec

from tttjax.model.attention import attention_band, resolve_impl
from tttjax.model.config import ModelConfig
from tttjax.model.params import flat_abstract, trainable
from tttjax.parallel.sharding import batch_parallelism, frozen_storage_drop, param_spec, without_axes

log = logging.getLogger(__name__)

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
# Checks


ADVICE = ("lower batch_size / duration_sec, use remat=full, raise num_microbatches or mesh.fsdp (shards params "
          "and optimizer state)")


def check_memory(need: int, capacity: int | None, *, mode: str, what: str, source: str,
                 where: str = "device memory", detail: str = "") -> str | None:
    """Training start-up: compare a step's per-device bytes (`source` says whose figure: the compiled
    step's or the analytic estimate; `detail` its breakdown, logged) with `capacity` bytes of
    `where`; raise (mode "error", one line) or warn when it does not fit. Returns the warning text,
    if any. mode: "error" | "warn" | "off"."""
    if mode not in ("error", "warn", "off"):
        raise ValueError(f"memory_check={mode!r}: expected error, warn or off")
    if mode == "off" or capacity is None:
        return None
    text = (f"per-device memory for {what}: {format_bytes(need)} of {format_bytes(capacity)} of {where} "
            f"({source})")
    if need > capacity:
        if mode == "error":
            log.info("%s%s", text, detail and "\n" + detail)
            raise ValueError(f"{text} does not fit: {ADVICE} (memory_check=warn runs anyway)")
        text += f"\ndoes not fit: {ADVICE}"
    elif need > 0.9 * capacity:
        text += "\nwithin 10% of device memory"
    else:
        log.info("%s%s", text, detail and "\n" + detail)
        return None
    log.warning("%s%s", text, detail and "\n" + detail)
    return text


_COMPILE_OOM = (re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"),
                re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"))
_UNIT = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 ** 4}


def compile_oom(error: BaseException) -> tuple[int, int] | None:
    """(bytes needed, bytes available) from XLA:TPU's compile-time out-of-memory error, else None.

    XLA:TPU refuses at compile time a program whose buffers exceed HBM; it reports either its
    temporaries or all it uses, against the HBM it can use (a little under the chip's)."""
    for pattern in _COMPILE_OOM:
        match = pattern.search(str(error))
        if match:
            need, unit, have, have_unit = match.groups()
            return int(float(need) * _UNIT[unit]), int(float(have) * _UNIT[have_unit])
    return None


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


class BatchTooLarge(ValueError):
    """--batch_size does not fit the device memory; the message says what would."""


def check_batch(cfg: ModelConfig, batch_size: int, frames: int, *, compiled=None, margin: float = 0.9) -> None:
    """Evaluation: raise BatchTooLarge if a [batch_size, 17, frames] forward would not fit the free memory.

    `compiled` (a jax Compiled) adds XLA's own temp-size figure where the backend reports one.
    """
    if batch_size < 1:
        raise BatchTooLarge(f"--batch_size={batch_size} must be >= 1")
    need = estimate_memory(cfg, batch_size=batch_size, num_frames=frames, training=False,
                           platform=jax.default_backend()).activations
    figures = compiled_figures(compiled) if compiled is not None else None
    if figures is not None:
        need = max(need, figures["temp_bytes"] + figures["output_bytes"])
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
