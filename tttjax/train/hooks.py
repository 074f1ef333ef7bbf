"""What happens around each train step, as hooks on the step loop (Levanter's TrainerHooks).

The loop steps and hands every hook a `StepInfo`; each hook acts at its own cadence: the progress
line, the metrics log, the evaluations, the checkpoint (which also ends the run at a preemption
or an interrupt, by setting `info.stop`). Hooks run in the order given, the checkpoint last, so a
step is saved after it was logged and evaluated.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable

import jax
from tqdm import tqdm

from tttjax.train.logger import RunLogger


@dataclasses.dataclass
class StepInfo:
    step: int  # optimizer steps done, counting the resumed ones
    metrics: dict[str, float]  # of this step (loss, grad_norm, lr, frames_per_s, ...)
    next_example: int  # the first global example of the next step
    last: bool  # step == max_steps
    stop: str | None = None  # set by a hook to end the run after this step: "preempted" | "interrupted"


class Hook:
    phase = "training"  # what the run is doing while the hook runs (the watchdog's phase)

    def on_step(self, info: StepInfo) -> None:
        """After each step."""

    def close(self) -> None:
        """When the loop ends, however it ends."""


class Progress(Hook):
    """A progress bar on a terminal; elsewhere (a redirected log) a plain line every `log_freq` steps."""

    def __init__(self, start: int, total: int, log_freq: int, *, interactive: bool | None = None):
        self.enabled = jax.process_index() == 0
        self.total, self.log_freq = total, log_freq
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self.bar = None
        if self.enabled and self.interactive:  # cleared at the end: the summary (or an error) is the last line
            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, leave=False)

    def on_step(self, info: StepInfo) -> None:
        loss, fps = info.metrics["loss"], info.metrics["frames_per_s"]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", fps=f"{fps:.0f}")
        elif self.enabled and (info.step % self.log_freq == 0 or info.last):
            print(f"step {info.step}/{self.total} loss {loss:.4f} {fps:.0f} frames/s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class LogMetrics(Hook):
    """Every `log_freq` steps (and the last): the step's metrics to train.log, metrics.jsonl, TensorBoard, wandb."""

    def __init__(self, logger: RunLogger, log_freq: int):
        self.logger, self.log_freq = logger, log_freq

    def on_step(self, info: StepInfo) -> None:
        if info.step % self.log_freq == 0 or info.last:
            self.logger.scalars(info.step, "train", info.metrics)
            self.logger.info(f"step {info.step} " + " ".join(f"{k}={v:.4g}" for k, v in info.metrics.items()))


class Evaluate(Hook):
    """Each configured evaluation every its `freq` steps, on the current weights (`model()`)."""

    phase = "evaluation"

    def __init__(self, logger: RunLogger, evaluations: list, model: Callable):
        self.logger, self.evaluations, self.model = logger, evaluations, model

    def on_step(self, info: StepInfo) -> None:
        due = [e for e in self.evaluations if info.step % e.freq == 0]
        if not due:
            return
        model = self.model()
        for evaluation in due:
            self.logger.info(f"eval {evaluation.name} step {info.step}: started")
            tic = time.perf_counter()
            results = evaluation(model, step=info.step)
            self.logger.scalars(info.step, evaluation.split, evaluation.scalars(results))
            self.logger.say(f"eval {evaluation.name} step {info.step}: {evaluation.line(results)} "
                            f"({time.perf_counter() - tic:.1f} s)")


class Checkpoint(Hook):
    """Saves at the configured cadence, at the last step, and when the run must stop (`stop_reason`:
    a preemption notice agreed by every process, or Ctrl-C); then it sets `info.stop`."""

    phase = "saving"

    def __init__(self, save: Callable[[int, int, bool], bool], stop_reason: Callable[[int], str | None],
                 wait: Callable[[], None]):
        self.save, self.stop_reason, self.wait = save, stop_reason, wait

    def on_step(self, info: StepInfo) -> None:
        stop = self.stop_reason(info.step)
        self.save(info.step, info.next_example, stop is not None or info.last)
        if stop:
            self.wait()  # the save is committed before the process ends
            info.stop = stop
