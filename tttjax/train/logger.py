"""Run logging: logs/train.log (text), logs/metrics.jsonl, TensorBoard events, optional wandb
(`pip install -e .[wandb]`; its files go to run_dir/wandb/, offline by default).

Only process 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import jax
from tqdm import tqdm

from tttjax.errors import UserError


def check_wandb(wandb_config) -> None:
    """At start-up, before anything compiles: wandb.project set needs the wandb package."""
    if not wandb_config.project:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError(f"wandb.project={wandb_config.project}: wandb is not installed "
                         f"(pip install -e .[wandb]), or set wandb.project=''") from None


def say_early(run_dir: Path, message: str) -> None:
    """`RunLogger.say` before the run's logger exists (a run stopped during start-up): the line on
    the terminal and appended to train.log (process 0)."""
    if jax.process_index() != 0:
        return
    print(message, flush=True)
    logs = Path(run_dir) / "logs"
    try:
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / "train.log", "a") as f:
            f.write(f"{logging.Formatter().formatTime(logging.makeLogRecord({}))} WARNING {message}\n")
    except OSError:  # the terminal has it; the run dir may be what failed
        pass


class RunLogger:
    def __init__(self, run_dir: Path, wandb_config=None, run_config: dict | None = None):
        self.enabled = jax.process_index() == 0
        self.log = logging.getLogger("tttjax")
        self._tb = self._wandb = self._jsonl = None
        if not self.enabled:
            return
        logs = run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log.setLevel(logging.INFO)
        self.log.propagate = False  # the terminal shows the progress bar and the summary, not every line
        handler = logging.FileHandler(logs / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.log.addHandler(handler)
        self._terminal_handlers = _route_library_logs(handler)
        self._jsonl = open(logs / "metrics.jsonl", "a")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(logs))
        if wandb_config is not None and wandb_config.project:
            import wandb

            if wandb_config.offline:
                os.environ["WANDB_MODE"] = "offline"
            self._wandb = wandb.init(project=wandb_config.project, dir=str(run_dir),
                                     name=wandb_config.run_name or run_dir.name, config=run_config)

    def info(self, message: str) -> None:
        if self.enabled:
            self.log.info(message)

    def warning(self, message: str) -> None:
        if self.enabled:
            self.log.warning(message)

    def say(self, message: str, *, warning: bool = False) -> None:
        """One line to train.log and to the terminal: what the run decided or found, which the user
        must see (a set-aside step, an evaluation, why it stopped)."""
        if self.enabled:
            (self.log.warning if warning else self.log.info)(message)
            tqdm.write(message, file=sys.stdout)  # above a progress bar, if one is drawn

    def flush(self) -> None:
        """Everything written so far onto disk (a process about to end without `close`)."""
        if self.enabled:
            for handler in self.log.handlers:
                handler.flush()
            self._jsonl.flush()
            self._tb.flush()

    def scalars(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        self._jsonl.flush()
        for k, v in values.items():
            self._tb.add_scalar(f"{split}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{split}/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()
            root = logging.getLogger()
            for handler in list(self.log.handlers):
                self.log.removeHandler(handler)
                root.removeHandler(handler)
                handler.close()
            for handler in self._terminal_handlers:
                root.addHandler(handler)


def _route_library_logs(file_handler: logging.Handler) -> list[logging.Handler]:
    """While the run lasts, what libraries log on the root logger goes to train.log, not the terminal
    (Orbax's writer threads log every failure of a save with its traceback; the run says it in one
    line). Returns the terminal handlers taken off, which `close` puts back, from then on without
    Orbax's background threads (a failed save's threads may still log while the process exits)."""
    root = logging.getLogger()
    terminal = [h for h in root.handlers if getattr(h, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__)]
    for handler in terminal:
        root.removeHandler(handler)
        handler.addFilter(_not_a_checkpoint_thread)
    root.addHandler(file_handler)
    return terminal


def _not_a_checkpoint_thread(record: logging.LogRecord) -> bool:
    return not (record.name == "absl" and record.threadName != "MainThread")
