"""What ends a training process promptly, whatever it is doing: Ctrl-C, a preemption notice, a lost peer.

A Python signal handler runs only when the main thread comes back to the interpreter, which an XLA
compile (minutes for a 7B step) or a collective waiting for a dead process never does. So a thread
watches instead: it learns of Ctrl-C at once (`signal.set_wakeup_fd`), of a preemption notice
(SIGTERM, taken by JAX's handler in whichever process got it) from JAX's key-value store within a
second or two, and of a lost process from the heartbeats (`parallel.distributed.Heartbeats`). Then,
by the phase the trainer says it is in:

- start-up, compilation, the first step (`EARLY`): nothing this process could save yet exists;
  the process ends at once, with the reason in one line (terminal and train.log);
- later phases: the trainer ends the run at the next step boundary and saves that step (with
  several processes, at the step JAX's preemption sync agrees on); if the run has not ended
  `stop_timeout_s` after the signal (stuck in a long evaluation compile, say), the process ends
  without a new save, after the save being written, if any, commits; a save or an export in
  progress is never cut;
- a second Ctrl-C, or a lost process (exit `LOST_PROCESS`), ends the process at once.

Exit codes: 130 after Ctrl-C (`INTERRUPTED`), 0 after a preemption notice, 75 for a lost process.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from typing import Callable

import jax

from tttjax.errors import INTERRUPTED, LOST_PROCESS
from tttjax.parallel.distributed import Heartbeats, connected, preemption_noticed

EARLY = ("start-up", "compilation and the first step")  # phases with nothing to save yet
UNCUT = ("saving", "export", "finishing")  # phases the deadline waits for
POLL_S = 0.1  # how often the thread looks at the signal pipe
STORE_POLL_S = 1.0  # how often it asks JAX's key-value store (notice, heartbeats)


def _exit_now(message: str, code: int) -> None:
    """The end before a trainer is attached: the line on the terminal, then exit."""
    print(message, file=sys.stderr, flush=True)
    os._exit(code)


class Watchdog:
    """A context manager (the CLI's, around the whole run): installs the SIGINT / SIGTERM handlers
    and the thread, and restores them after. The trainer sets `phase`, calls `attach(end)` with
    its way to end the process (`end(message, code, wait_for_save)`), and reads `interrupted`,
    `terminated` and `stop_requested` at step boundaries."""

    def __init__(self, stop_timeout_s: float, heartbeat_timeout_s: float):
        self.stop_timeout_s, self.heartbeat_timeout_s = stop_timeout_s, heartbeat_timeout_s
        self.phase = EARLY[0]
        self.interrupted = False  # Ctrl-C
        self.terminated = False  # SIGTERM in a process without jax.distributed (no JAX notice)
        self.stop_since: float | None = None  # when the first stop request came
        self._end: Callable[[str, int, bool], None] = lambda message, code, wait: _exit_now(message, code)
        self._heartbeats: Heartbeats | None = None
        self._lost = threading.Event()
        self._done = threading.Event()

    @property
    def stop_requested(self) -> bool:
        return self.stop_since is not None

    def attach(self, end: Callable[[str, int, bool], None]) -> None:
        self._end = end

    # -- installation ---------------------------------------------------------------------------
    def __enter__(self) -> Watchdog:
        self._read, write = os.pipe()
        os.set_blocking(write, False)
        self._write = write
        self._previous_fd = signal.set_wakeup_fd(write)
        # Python handlers (the wakeup fd only sees signals that have one) that do nothing themselves:
        # the thread acts. JAX replaces the SIGTERM one with its own when jax.distributed starts.
        self._previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
        self._thread = threading.Thread(target=self._watch, name="tttjax-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        signal.set_wakeup_fd(self._previous_fd)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        os.close(self._read)
        os.close(self._write)

    # -- the thread -----------------------------------------------------------------------------
    def _watch(self) -> None:
        asked = 0.0
        while not self._done.is_set():
            ready, _, _ = select.select([self._read], [], [], POLL_S)
            if ready:
                for signum in os.read(self._read, 64):
                    self._on_signal(signum)
            now = time.monotonic()
            if now - asked >= STORE_POLL_S:
                asked = now
                self._ask_store()
            if (self.stop_since is not None and self.phase not in EARLY + UNCUT
                    and now - self.stop_since > self.stop_timeout_s):
                self._end(f"{self._reason()} while {self.phase}, and the run did not reach a step boundary within "
                          f"checkpoint.stop_timeout_s={self.stop_timeout_s:g} s: stopped without a new save",
                          self._code(), True)

    def _ask_store(self) -> None:
        if connected():
            if self.stop_since is None and preemption_noticed():
                self._request("preempted")
            if self._heartbeats is None and jax.process_count() > 1:
                self._heartbeats = Heartbeats(self.heartbeat_timeout_s)
        lost = self._heartbeats.beat() if self._heartbeats is not None else None
        if lost:
            self._lost.set()
            self._end(f"{lost}: this process stops (exit {LOST_PROCESS}); relaunch the job to resume from the "
                      f"last committed step", LOST_PROCESS, False)

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGINT:
            if self.interrupted:
                self._end(f"interrupted again (Ctrl-C) while {self.phase}: stopped at once", INTERRUPTED, False)
                return
            self.interrupted = True
            self._request("interrupted")
            if connected() and self.phase not in EARLY:
                os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notice: every process stops at one step
        elif signum == signal.SIGTERM:  # only without jax.distributed: JAX's own handler takes it otherwise
            self.terminated = True
            self._request("preempted")

    def _request(self, reason: str) -> None:
        if self.stop_since is None:
            self.stop_since = time.monotonic()
        if self.phase in EARLY:
            self._end(f"{self._reason()} during {self.phase}: nothing to save yet; re-run the same command to "
                      f"start (or resume) again", self._code(), False)

    def _reason(self) -> str:
        return "interrupted (Ctrl-C)" if self.interrupted else "preempted (SIGTERM)"

    def _code(self) -> int:
        return INTERRUPTED if self.interrupted else 0

    def wait_for_lost_process(self) -> bool:
        """After a collective failed (several processes): waits up to the heartbeat timeout for the
        thread to find the lost process (it then ends this one); False if none was lost."""
        return self._lost.wait(self.heartbeat_timeout_s + 2 * STORE_POLL_S)
