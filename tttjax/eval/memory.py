"""Batch-size guard: refuse batch sizes that would not fit, and turn an XLA OOM into one line."""

from __future__ import annotations

import os

GIB = 1 << 30


class BatchTooLarge(ValueError):
    """--batch_size does not fit the device memory; the message says what would."""


def free_bytes() -> int | None:
    """Free memory of the first device (accelerator: its allocator's limit minus use; CPU: MemAvailable)."""
    import jax

    device = jax.local_devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not implement it
        stats = None
    if stats and "bytes_limit" in stats:
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


def estimate_bytes(cfg, batch_size: int, frames: int) -> int:
    """A deliberately rough upper estimate of the forward's working memory (not the params).

    fp32 logits and their log-softmax ([B, T, text_card + dep_q * card], three live copies), the
    attention scores and probabilities of one layer ([B, H, T, min(T, context)] fp32, two copies),
    the depformer's per-slot activations, and a few [B, T, hidden] activations of one layer.
    """
    B, T = batch_size, frames
    window = min(T, cfg.context or T)
    vocab = cfg.text_card + cfg.dep_q * cfg.card
    logits = 3 * 4 * B * T * vocab
    attention = 2 * 4 * B * cfg.num_heads * T * window
    dep_window = min(cfg.dep_q, cfg.depformer_context or cfg.dep_q)
    depformer = 4 * B * T * cfg.dep_q * (6 * cfg.depformer_hidden + 2 * cfg.depformer_num_heads * dep_window)
    temporal = 4 * B * T * (8 * cfg.dim + 3 * cfg.hidden)
    return logits + attention + depformer + temporal


def check_batch(cfg, batch_size: int, frames: int, *, compiled=None, margin: float = 0.9) -> None:
    """Raise BatchTooLarge if a [batch_size, 17, frames] forward would not fit the free memory.

    `compiled` (a jax Compiled) adds XLA's own temp-size figure where the backend reports one.
    """
    if batch_size < 1:
        raise BatchTooLarge(f"--batch_size={batch_size} must be >= 1")
    need = estimate_bytes(cfg, batch_size, frames)
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
                        f"{need / GIB:.1f} GiB for activations and logits but only {free / GIB:.1f} GiB is free; "
                        f"{hint}")


def is_oom(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def oom_message(batch_size: int, frames: int) -> str:
    return (f"out of device memory evaluating --batch_size={batch_size} with {frames}-frame sequences; "
            f"lower --batch_size")
