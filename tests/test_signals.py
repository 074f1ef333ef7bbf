"""Ctrl-C (SIGINT) and SIGTERM at every phase of a tiny run (issue 28): start-up, compilation and
the first step, an evaluation, a save, the final export. Each ends the run within a bounded time
with its reason as the last line of the terminal and of train.log, the exit code 130 after Ctrl-C,
and only complete, finite steps saved."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import micro
import pytest

from tttjax import rundir

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 4
CLI = micro.cli(max_steps=MAX_STEPS, batch_size=4, duration_sec=1.28, ckpt_freq=2, eval_freq=2, eval_batches=20,
                data__train_data="synthetic:64", data__eval_data="synthetic:8")
EARLY_BOUND_S = 8  # measured 0.05-1.2 s on 2 idle cores; nothing to save, so nothing to wait for
LATE_BOUND_S = 45  # the rest of the evaluation (3 s here) or of the save, then the step's save
# The evaluation phase's runs evaluate 200 batches (2.5-3 s here), not 2: with the suite's warm
# compilation cache 2 batches took about 1 s, and under CI's load the signal once landed after the
# evaluation and the step-2 save check (saved step 3).
LONG_EVAL = ["--config.data.eval_data=synthetic:800", "--config.eval_batches=200"]

# phase -> (what train.log says when the phase begins, the last line's pattern for SIGINT and SIGTERM)
PHASES = {
    "start-up": (None, r"interrupted \(Ctrl-C\) during start-up: nothing to save yet",
                 r"preempted \(SIGTERM\) during start-up: nothing to save yet"),
    "compilation and the first step": ("start at step 0/4",
                                       r"interrupted \(Ctrl-C\) during (start-up|compilation and the first step): "
                                       r"nothing to save yet",
                                       r"preempted \(SIGTERM\) during (start-up|compilation and the first step): "
                                       r"nothing to save yet"),
    "evaluation": ("eval standard step 2: started", r"interrupted at step [24] of 4: saved step [24];",
                   r"(preempted at step [234] of 4: saved step [234];|finished: steps 0->4)"),
    "save": ("checkpoint 2: saving", r"interrupted at step [234] of 4: saved step [234];",
             r"(preempted at step [234] of 4: saved step [234];|finished: steps 0->4)"),
    "final export": ("checkpoint 4: exporting", r"interrupted at step 4 of 4: saved step 4;",
                     r"(preempted at step 4 of 4: saved step 4;|finished: steps 0->4)"),
}


def start(run_dir: Path, extra: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tttjax.main", *CLI, *extra, f"--config.run_dir={run_dir}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"})


def reached(run_dir: Path, marker: str | None) -> bool:
    if marker is None:  # the run holds its lock (its holder written): it is past the imports
        lock = run_dir / "run.lock"
        return lock.is_file() and bool(lock.read_text().strip())
    log = run_dir / "logs" / "train.log"
    return log.is_file() and marker in log.read_text()


@pytest.mark.parametrize("phase", list(PHASES))
def test_each_signal_at_each_phase_ends_the_run_promptly(tmp_path, phase):
    marker, *patterns = PHASES[phase]
    runs = {sig: (tmp_path / sig.name, pattern) for sig, pattern in zip((signal.SIGINT, signal.SIGTERM), patterns)}
    extra = LONG_EVAL if phase == "evaluation" else []
    procs = {sig: start(run_dir, extra) for sig, (run_dir, _) in runs.items()}  # both signals at once: 2 cores
    sent = {}
    deadline = time.monotonic() + 300
    while len(sent) < len(procs):
        for sig, proc in procs.items():
            if sig not in sent and reached(runs[sig][0], marker):
                if marker is None:
                    time.sleep(0.3)  # the watchdog is given the trainer right after the lock
                proc.send_signal(sig)
                sent[sig] = time.monotonic()
            assert sig in sent or proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{phase}: never reached {marker!r}"
        time.sleep(0.02)
    for sig, proc in procs.items():
        run_dir, pattern = runs[sig]
        out, err = proc.communicate(timeout=180)
        took = time.monotonic() - sent[sig]
        bound = EARLY_BOUND_S if marker is None or "first step" in phase else LATE_BOUND_S
        assert took < bound, f"{sig.name} during {phase}: exit after {took:.1f} s"
        assert proc.returncode == (130 if sig == signal.SIGINT else 0), (sig.name, proc.returncode, err[-3000:])
        assert "Traceback" not in err, err[-3000:]
        last = out.strip().splitlines()[-1]
        assert re.match(pattern, last), (sig.name, phase, last)
        assert last in (run_dir / "logs" / "train.log").read_text().strip().splitlines()[-1]
        checkpoints = rundir.checkpoints_dir(run_dir)
        committed = sorted(p.name for p in checkpoints.iterdir()) if checkpoints.is_dir() else []
        if "nothing to save" in last:
            assert committed == [], committed
        for name in committed:  # every saved step is complete: its data position and digests are there
            step = int(name.split("_")[1])
            assert step in (2, 3, 4), committed
            position = json.loads((checkpoints / name / rundir.DATA / rundir.DATA_FILE).read_text())
            assert position["next_step"] == step and (checkpoints / name / rundir.DIGESTS).is_dir()


def test_a_run_that_cannot_reach_a_step_boundary_is_cut_after_stop_timeout_s(tmp_path):
    """Ctrl-C during a long evaluation (1000 batches) with checkpoint.stop_timeout_s=1: the watchdog
    ends the process about a second later without a new save (step 2 was not saved yet: the
    evaluation runs before the checkpoint)."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tttjax.main", *CLI, "--config.eval_batches=1000", "--config.data.eval_data=synthetic:4000",
                             "--config.checkpoint.stop_timeout_s=1", f"--config.run_dir={run_dir}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"})
    deadline = time.monotonic() + 300
    while not reached(run_dir, "eval standard step 2: started"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    out, err = proc.communicate(timeout=120)
    assert time.monotonic() - sent < EARLY_BOUND_S and proc.returncode == 130, err[-3000:]
    last = out.strip().splitlines()[-1]
    assert last == ("interrupted (Ctrl-C) while evaluation, and the run did not reach a step boundary within "
                    "checkpoint.stop_timeout_s=1 s: stopped without a new save"), last
    assert last in (run_dir / "logs" / "train.log").read_text()
    assert not list(rundir.checkpoints_dir(run_dir).glob("checkpoint_*"))
