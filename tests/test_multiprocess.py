"""Two CPU processes (jax.distributed over localhost, gloo) through launch.local: SIGTERM one, both save
at the agreed step and exit 0; the run resumes in ONE process on a different mesh and ends where an
uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import micro
import numpy as np
import pytest

from tttjax.checkpoint import CheckpointManager

FAST_COMPILE = "--xla_backend_optimization_level=0"  # as tests/test_sharding.py: every run here uses it

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 16  # = tests/test_sharding.py MAX_STEPS: its 1-process (1,4,2) programs are then in the compile cache

# the micro model (tests/micro.py) as command-line overrides of configs/tiny.py
MICRO = micro.cli(max_steps=MAX_STEPS, batch_size=8, duration_sec=1.28, log_freq=1, ckpt_freq=0, eval_freq=0,
                  data__train_data="synthetic:64", export_dtype="float32")


def mesh(data, fsdp, tensor, dcn_data=1):
    return [f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}", f"--config.mesh.tensor={tensor}",
            f"--config.mesh.dcn_data={dcn_data}"]


def one_process(run_dir, *extra):
    """`python -m tttjax.main` in one process with 8 CPU devices on mesh (1, 4, 2)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}", JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "tttjax.main", *MICRO, f"--config.run_dir={run_dir}",
                             *mesh(1, 4, 2), *extra], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def losses(run_dir) -> dict[int, float]:
    lines = (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["split"] == "train"}


def final_export(run_dir) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(Path(run_dir) / "checkpoints" / f"checkpoint_{MAX_STEPS:06d}" / "consolidated"
                         / "lora.safetensors"))


def test_two_processes_preempted_then_resumed_on_one_process_and_another_mesh(tmp_path):
    """Tolerance: every run is fp32; the meshes (2,2,2) over 2 processes and (1,4,2) in one process
    only reorder reductions (per-step loss differences ~1e-7 relative), which 16 AdamW steps carry
    into the parameters: losses rtol 1e-5, final LoRA/TTT tensors atol 2e-5 (|values| <= ~1)."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    reference = one_process(ref)  # the uninterrupted run, meanwhile
    logs = tmp_path / "logs"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launch.local", "--num_processes=2", "--devices_per_process=4", f"--log_dir={logs}",
         "--grace_s=60", "--", *MICRO, f"--config.run_dir={run}", *mesh(1, 2, 2, dcn_data=2)],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ, XLA_FLAGS=FAST_COMPILE))
    pids = [int(launcher.stdout.readline().split()[-1]) for _ in range(2)]
    train_log = run / "logs" / "train.log"
    deadline = time.time() + 400
    while time.time() < deadline and not (train_log.exists() and "step 2 " in train_log.read_text()):
        assert launcher.poll() is None, (logs / "process_0.log").read_text()[-3000:]
        time.sleep(0.2)
    os.kill(pids[1], signal.SIGTERM)  # one process only: JAX's preemption sync tells the other
    out = launcher.communicate(timeout=300)[0]
    assert launcher.returncode == 0, out + (logs / "process_0.log").read_text()[-2000:] + \
        (logs / "process_1.log").read_text()[-2000:]
    assert "exit codes [0, 0]" in out
    steps = CheckpointManager(run, max_to_keep=None, save_interval_steps=0).all_steps()
    assert len(steps) == 1 and 2 <= steps[0] < MAX_STEPS, steps
    saved = steps[0]
    assert f"preempted at step {saved} of {MAX_STEPS}: saved step {saved}" in train_log.read_text()
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in train_log.read_text()

    # Relaunch: one process, 8 devices, mesh (1,4,2): restores the 2-process checkpoint and finishes.
    resumed = one_process(run)
    assert resumed.wait(timeout=400) == 0, resumed.stderr.read().decode()[-3000:]
    assert reference.wait(timeout=400) == 0, reference.stderr.read().decode()[-3000:]
    assert f"start at step {saved}/{MAX_STEPS}" in train_log.read_text()

    got, want = losses(run), losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, MAX_STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-5)
    a, b = final_export(run), final_export(ref)
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=2e-5, err_msg=key)


LAUNCHED: list[int] = []  # every pid a test below started: none outlives its test


@pytest.fixture(autouse=True)
def reap():
    yield
    while LAUNCHED:
        try:
            os.kill(LAUNCHED.pop(), signal.SIGKILL)
        except ProcessLookupError:
            pass


def launch(run_dir, logs, *extra, max_steps=MAX_STEPS, grace_s=60):
    """Two processes through launch.local on mesh (2, 2, 2); returns the launcher and the pids."""
    cli = micro.cli(max_steps=max_steps, batch_size=8, duration_sec=1.28, log_freq=1, ckpt_freq=0, eval_freq=0,
                    data__train_data="synthetic:64", export_dtype="float32")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launch.local", "--num_processes=2", "--devices_per_process=4", f"--log_dir={logs}",
         f"--grace_s={grace_s}", "--", *cli, f"--config.run_dir={run_dir}", *mesh(1, 2, 2, dcn_data=2), *extra],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ, XLA_FLAGS=FAST_COMPILE))
    pids = [int(launcher.stdout.readline().split()[-1]) for _ in range(2)]
    LAUNCHED.extend([launcher.pid, *pids])
    return launcher, pids


def wait_for(condition, launcher, logs, timeout=400):
    deadline = time.time() + timeout
    while not condition():
        assert launcher.poll() is None, (logs / "process_0.log").read_text()[-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def finished(launcher, logs, timeout=400) -> str:
    out = launcher.communicate(timeout=timeout)[0]
    assert launcher.returncode == 0, out + (logs / "process_0.log").read_text()[-3000:] + \
        (logs / "process_1.log").read_text()[-2000:]
    return out


def test_two_tiers_resume_from_the_newest_local_copy_bitwise(tmp_path):
    """Persistent every 10 steps, local every 2; the job is killed (SIGKILL, both processes) at step 7:
    the relaunch resumes from the local copies of step 6 and ends bitwise equal to an uninterrupted run."""
    from test_faults import assert_same_state

    from tttjax import rundir

    steps = 12
    tiers = lambda local: ["--config.ckpt_freq=10", f"--config.checkpoint.local_dir={local}",  # noqa: E731
                           "--config.checkpoint.local_ckpt_freq=2"]
    run, ref = tmp_path / "run", tmp_path / "ref"
    reference, _ = launch(ref, tmp_path / "ref-logs", *tiers(tmp_path / "ref-local"), max_steps=steps)
    logs = tmp_path / "logs"
    launcher, pids = launch(run, logs, *tiers(tmp_path / "local"), max_steps=steps)
    local = [rundir.local_root(tmp_path / "local", run, i, 2) for i in (0, 1)]
    wait_for(lambda: all(rundir.step_dir(root, 6).is_dir() for root in local), launcher, logs)
    for pid in pids:  # the job dies during step 7 (step 8's local copy is two steps and a save away)
        os.kill(pid, signal.SIGKILL)
    launcher.communicate(timeout=60)
    assert not rundir.checkpoints_dir(run).is_dir() or not list(rundir.checkpoints_dir(run).glob("checkpoint_*[0-9]"))

    launcher, _ = launch(run, logs, *tiers(tmp_path / "local"), max_steps=steps)
    finished(launcher, logs)
    finished(reference, tmp_path / "ref-logs")
    log = (run / "logs" / "train.log").read_text()
    assert f"start at step 6/{steps}" in log and "resuming from the local copy of step 6" in log
    assert CheckpointManager(run, max_to_keep=None, save_interval_steps=0).all_steps() == [10, 12]
    assert_same_state(rundir.step_dir(run, steps), rundir.step_dir(ref, steps))
    assert losses(run) == losses(ref)  # every step's loss, the replayed 7..12 included


def test_a_lost_process_ends_the_others_promptly_and_a_relaunch_resumes(tmp_path):
    """SIGKILL one process mid-step: the other stops within the heartbeat timeout (5 s here) with a
    line naming the lost one, exit 75, instead of waiting in a collective forever; the relaunch
    resumes from the last committed step. Losing the coordinator (process 0) ends the other at once
    (JAX's client aborts)."""
    from tttjax import rundir

    run, logs = tmp_path / "run", tmp_path / "logs"
    bounded = ["--config.ckpt_freq=2", "--config.distributed.heartbeat_timeout_s=5"]
    launcher, pids = launch(run, logs, *bounded, max_steps=300, grace_s=300)
    wait_for(lambda: rundir.step_dir(run, 4).is_dir(), launcher, logs)
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    out = launcher.communicate(timeout=120)[0]
    took = time.monotonic() - killed
    assert "exit codes [75, -9]" in out, out
    assert took < 5 + 10, f"the survivor took {took:.1f} s"  # the timeout, one poll, the launcher's own poll
    said = "process 1 of 2 has sent no heartbeat for 5 s: this process stops (exit 75); relaunch the job"
    assert said in (logs / "process_0.log").read_text() and said in (run / "logs" / "train.log").read_text()
    saved = CheckpointManager(run, max_to_keep=None, save_interval_steps=0).all_steps()[-1]

    launcher, pids = launch(run, logs, *bounded, max_steps=300, grace_s=300)
    wait_for(lambda: rundir.step_dir(run, saved + 2).is_dir(), launcher, logs)
    assert f"start at step {saved}/300" in (run / "logs" / "train.log").read_text()
    os.kill(pids[0], signal.SIGKILL)
    killed = time.monotonic()
    out = launcher.communicate(timeout=120)[0]
    assert time.monotonic() - killed < 15 and "exit codes [-9, " in out and "exit codes [-9, 0]" not in out, out
    assert "coordination service" in (logs / "process_1.log").read_text()
