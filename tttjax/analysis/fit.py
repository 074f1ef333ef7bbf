"""One compile-and-fit service for every program that must fit a device: the trainer's step (its
start-up check and the step loop), `tttjax.compile`'s train and eval steps, the evaluator's and the
paper metrics' forward passes.

It compiles (the compiler's out-of-memory refusal is a `jax.errors.JaxRuntimeError` whose status
is RESOURCE_EXHAUSTED; any other error passes through), reads the compiler's figures, compares them
(or the analytic estimate, where a backend reports none) with the capacity under one policy, and
words the one-line refusal with one advice text:

    compiled, refused = compile_program(lowered.compile)   # refused: Refusal(need, available)
    verdict(need, capacity)                    # "fits" | "tight" (above MARGIN) | "does not fit"
    check(need, capacity, mode=..., ...)       # training start-up: raise / warn / log
    check_train_step(compile_step, estimate, mode=..., what=..., advice=...)  # the trainer
    check_batch(cfg, batch_size, frames, compiled=None)  # evaluation: BatchTooLarge
    raise_if_oom(error, replacement)           # a step or batch that ran out of memory at run time
    train_advice(remat, mesh, topology=False) / step_sizes(...)  # the words
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Callable, Mapping

import jax

from tttjax.analysis import memory
from tttjax.analysis.memory import GiB, format_bytes
from tttjax.errors import UserError, is_out_of_memory
from tttjax.model.config import ModelConfig

log = logging.getLogger(__name__)

# A program that needs more than this share of its memory is "tight": the trainer and tttjax.compile
# warn, and batch sizes are suggested to stay below it (XLA's allocator, other processes on a host).
MARGIN = 0.9


class OutOfMemory(UserError):
    """A step that does not fit its device memory (one line, with what to change)."""


class BatchTooLarge(UserError):
    """--batch_size does not fit the device memory; the message says what would."""


@dataclasses.dataclass(frozen=True)
class Refusal:
    """The compiler's out-of-memory refusal: what it needed and what it could use (bytes per device;
    0 where its message gives no figures)."""

    need: int
    available: int


def is_oom(error: BaseException) -> bool:
    """An out-of-memory error of the XLA runtime or compiler (a JaxRuntimeError, tttjax/errors.py's test)."""
    return isinstance(error, jax.errors.JaxRuntimeError) and is_out_of_memory(error)


_FIGURES = (re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"),
            re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"))
_UNIT = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 ** 4}


def refusal(error: BaseException) -> Refusal | None:
    """The figures of an out-of-memory error (XLA:TPU reports either its temporaries or all it uses,
    against the HBM it can use, a little under the chip's); None if `error` is not out-of-memory."""
    if not is_oom(error):
        return None
    for pattern in _FIGURES:
        match = pattern.search(str(error))
        if match:
            need, unit, have, have_unit = match.groups()
            return Refusal(int(float(need) * _UNIT[unit]), int(float(have) * _UNIT[have_unit]))
    return Refusal(0, 0)


def compile_program(build: Callable[[], object]):
    """(compiled, None), or (None, Refusal) where the compiler refuses the program for memory."""
    try:
        return build(), None
    except jax.errors.JaxRuntimeError as e:
        refused = refusal(e)
        if refused is None:
            raise
        return None, refused


def raise_if_oom(error: BaseException, replacement: BaseException) -> None:
    """Raise `replacement` (one line, without the runtime's traceback) if `error` is out-of-memory."""
    if is_oom(error):
        raise replacement from None


def verdict(need: int, capacity: int | None) -> str:
    if capacity is None or need <= MARGIN * capacity:
        return "fits"
    return "tight" if need <= capacity else "does not fit"


def step_sizes(batch_size: int, duration_sec: float, remat: str, num_microbatches: int,
               mesh: Mapping[str, int]) -> str:
    """The sizes a step's memory depends on, as the refusals name them."""
    return (f"batch_size={batch_size}, duration_sec={duration_sec}, remat={remat}, num_microbatches={num_microbatches}, "
            f"mesh {dict(mesh)}")


def train_advice(remat: str, mesh: Mapping[str, int], *, topology: bool = False) -> str:
    """What shrinks a train step's per-device memory, most effective first."""
    tips = ["remat=full"] if remat != "full" else []
    tips.append("mesh.fsdp in place of mesh.data" if mesh.get("data", 1) > 1 else
                "a larger mesh.fsdp (shards params and optimizer state)")
    tips += ["a higher num_microbatches", "a shorter duration_sec or a smaller batch_size"]
    if topology:
        tips.append("a larger topology")
    return "try " + ", ".join(tips[:-1]) + " or " + tips[-1]


def check(need: int, capacity: int | None, *, mode: str, what: str, source: str, advice: str,
          where: str = "device memory", detail: str = "") -> str | None:
    """Compare a step's per-device bytes (`source`: whose figure) with `capacity` bytes of `where`:
    does not fit -> raise OutOfMemory (mode "error") or warn ("warn"); tight -> warn. Returns the
    warning text, if any. `mode` is the schema's checked `memory_check`."""
    if mode == "off" or capacity is None:
        return None
    text = f"per-device memory for {what}: {format_bytes(need)} of {format_bytes(capacity)} of {where} ({source})"
    state = verdict(need, capacity)
    if state == "fits":
        log.info("%s%s", text, detail and "\n" + detail)
        return None
    if state == "does not fit":
        if mode == "error":
            log.info("%s%s", text, detail and "\n" + detail)
            raise OutOfMemory(f"{text} does not fit: {advice} (memory_check=warn runs anyway)")
        text += f"\ndoes not fit: {advice}"
    else:
        text += f"\nwithin {1 - MARGIN:.0%} of {where}"
    log.warning("%s%s", text, detail and "\n" + detail)
    return text


def check_train_step(compile_step: Callable[[], object], estimate: Callable[[], memory.MemoryEstimate], *,
                     mode: str, what: str, advice: str, platform: str, compile_anyway: bool = False) -> None:
    """The trainer's start-up check: where the device reports its memory (TPU, GPU), compile the step
    (`compile_step`, which keeps the program it compiles) and check the compiler's figures; on CPU
    the analytic `estimate` against the host's available memory shared by its devices, before
    anything compiles. `compile_anyway`: compile (load) the step whatever the mode and device."""
    capacity, where = memory.device_memory_bytes(), "device memory"
    if mode == "off" and not compile_anyway:
        return
    if capacity is not None or compile_anyway:
        compiled, refused = compile_program(compile_step)
        if refused is not None:
            raise OutOfMemory(f"per-device memory for {what}: the compiler needs {format_bytes(refused.need)} of the "
                              f"{format_bytes(refused.available)} it can use: {advice}")
        figures = memory.compiled_figures(compiled)
        if figures is not None and capacity is not None:
            check(figures["total_bytes"], capacity, mode=mode, what=what, advice=advice,
                  source="the compiled step's memory_analysis")
            return
    if mode == "off":
        return
    if capacity is None and platform == "cpu":
        free = memory.free_bytes()
        capacity, where = (free // jax.local_device_count() if free else None), "available host memory"
    need = estimate()
    check(need.total, capacity, mode=mode, what=what, where=where, advice=advice, source="analytic estimate",
          detail=need.table())


# ----------------------------------------------------------------------------------------------
# Evaluation batches


def batch_oom_message(batch_size: int, frames: int) -> str:
    return (f"out of device memory evaluating --batch_size={batch_size} with {frames}-frame sequences; "
            f"lower --batch_size")


def check_batch(cfg: ModelConfig, batch_size: int, frames: int, *, compiled=None) -> None:
    """Evaluation: raise BatchTooLarge if a [batch_size, 17, frames] forward would not fit the free
    memory (the estimate's activations and logits, or XLA's own temporaries where `compiled` reports
    them); the message suggests the batch that stays within MARGIN of it."""
    if batch_size < 1:
        raise BatchTooLarge(f"--batch_size={batch_size} must be >= 1")
    need = memory.estimate_memory(cfg, batch_size=batch_size, num_frames=frames, training=False,
                                  platform=jax.default_backend()).activations
    figures = memory.compiled_figures(compiled) if compiled is not None else None
    if figures is not None:
        need = max(need, figures["temp_bytes"] + figures["output_bytes"])
    free = memory.free_bytes()
    if verdict(need, free) != "does not fit":
        return
    fits = int(MARGIN * free // max(1, need // batch_size))
    hint = f"try --batch_size={fits}" if fits >= 1 else "even --batch_size=1 does not fit; use a larger device"
    raise BatchTooLarge(f"--batch_size={batch_size} with {frames}-frame sequences needs about "
                        f"{need / GiB:.1f} GiB for activations and logits but only {free / GiB:.1f} GiB is free; "
                        f"{hint}")
