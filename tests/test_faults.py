"""Fault injection on the run directory (issue 17): one case per fault an operator can cause.

NaN steps, a resume from an earlier step, two writers, corrupt checkpoints, a changed data stream,
a damaged data shard, environment errors, and a chaos run (SIGKILL, SIGTERM, truncated files
between restarts) that still ends bitwise equal to an uninterrupted run. Every case reuses one
trained micro run (`trained`), copied per test.
"""

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import micro
import numpy as np
import pytest
from test_train import micro_config

from tttjax import rundir
from tttjax.checkpoint import CheckpointError, CheckpointManager, RunDirError
from tttjax.checkpoint import consolidated as consolidated_mod
from tttjax.checkpoint.resume import ResumeError
from tttjax.train.loop import Trainer, TrainingError
from tttjax.weights.sources import OrbaxSource

REPO = Path(__file__).resolve().parents[1]
STEPS = 8  # the trained run: a checkpoint at every step


def steps_of(run_dir) -> list[int]:
    m = CheckpointManager(run_dir, max_to_keep=None, save_interval_steps=1)
    m.close()
    return m.all_steps()


def stored(step_dir: Path) -> dict:
    """Every array of a step's train state (params and optimizer state), read from disk."""
    source = OrbaxSource(step_dir / rundir.STATE)
    return {path: source.read(path) for path in source.specs}


def assert_same_state(a: Path, b: Path) -> None:
    sa, sb = stored(a), stored(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=str(k))


def damage(step_dir: Path) -> None:
    """Truncates every file of a step's train state to half its size (as a full disk or a killed
    copy leaves it); a single OCDBT data file is not enough: most of them restore truncated."""
    for path in (step_dir / rundir.STATE).rglob("*"):
        if path.is_file():
            os.truncate(path, path.stat().st_size // 2)


def one_line(text: str) -> str:
    """The error text of a CLI: exactly one non-empty line, no traceback."""
    lines = [line for line in text.splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    trainer = Trainer(micro_config(run_dir, max_steps=STEPS, ckpt_freq=1))
    assert trainer.run() == 0
    assert steps_of(run_dir) == list(range(1, STEPS + 1))
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


# 1 ------------------------------------------------------------------------------------------
def test_nan_step_is_never_saved_and_a_rerun_continues(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError) as e:
        Trainer(micro_config(run_dir, max_steps=STEPS, ckpt_freq=1, **{"optim.lr": 1e6})).run()
    saved = steps_of(run_dir)
    bad = int(str(e.value).split(" at step ")[1].split()[0])
    assert "non-finite loss, gradient norm or parameters" in str(e.value)
    assert saved == list(range(1, bad)), saved  # every finite step, not the diverged one
    assert (f"the last checkpoint, step {saved[-1]} in {run_dir}, is finite and a re-run resumes from it" if saved
            else "there is no checkpoint yet, so a re-run starts over") in str(e.value)
    for step in saved:
        assert all(np.isfinite(v).all() for v in stored(rundir.step_dir(run_dir, step)).values()), step
    if saved:  # the user lowers the LR and re-runs: it continues from the last finite step
        again = Trainer(micro_config(run_dir, max_steps=STEPS, ckpt_freq=1, **{"optim.lr": 1e-3}))
        assert again.restore() == saved[-1]


def test_non_finite_checkpoint_of_an_older_version_is_skipped(run_copy):
    """A NaN step saved before the guard existed restores, is recognised as broken and set aside."""
    nan = Trainer(micro_config(run_copy, max_steps=STEPS, ckpt_freq=1))
    nan.state = nan.state.replace(params=jax.tree.map(lambda x: x * np.nan, nan.state.params))
    nan.manager.set_aside([STEPS], run_copy / "elsewhere")
    assert nan.manager.save(STEPS, nan.state, {"next_step": STEPS}, force=True)
    nan.manager.close()
    resumed = Trainer(micro_config(run_copy, max_steps=STEPS, ckpt_freq=1))
    assert resumed.restore() == STEPS - 1
    assert any("non-finite values" in n for n in resumed.notes)
    assert (rundir.broken_dir(run_copy) / f"checkpoint_{STEPS:06d}").is_dir()


# 2 ------------------------------------------------------------------------------------------
def test_resume_from_an_earlier_step_keeps_the_later_ones_and_saves_the_new(run_copy, trained):
    old = {s: rundir.step_dir(run_copy, s).stat().st_ino for s in (6, 7, 8)}
    trainer = Trainer(micro_config(run_copy, max_steps=STEPS, ckpt_freq=1, **{"checkpoint.resume_step": 5}))
    assert trainer.run() == 0
    aside = rundir.superseded_dir(run_copy, 5)
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint_000006", "checkpoint_000007",
                                                       "checkpoint_000008"]
    assert {s: (aside / f"checkpoint_{s:06d}").stat().st_ino for s in old} == old  # the old ones, moved
    assert steps_of(run_copy) == list(range(1, STEPS + 1))
    for s in (6, 7, 8):  # saved anew (same config: the same values)
        assert rundir.step_dir(run_copy, s).stat().st_ino != old[s]
    assert_same_state(rundir.step_dir(run_copy, STEPS), rundir.step_dir(trained, STEPS))
    assert "moved the later steps [6, 7, 8]" in (run_copy / "logs" / "train.log").read_text()


# 3 ------------------------------------------------------------------------------------------
def hold_lock(run_dir: Path) -> subprocess.Popen:
    code = ("import sys, time; from tttjax.checkpoint import lock; lock.acquire(sys.argv[1]); "
            "print('HELD', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"})
    assert proc.stdout.readline().strip() == b"HELD"
    return proc


def test_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    from tttjax import main as main_mod

    run_dir = tmp_path / "run"
    in_flight = run_dir / "checkpoints" / "checkpoint_000003.orbax-checkpoint-tmp"
    in_flight.mkdir(parents=True)
    holder = hold_lock(run_dir)
    try:
        with pytest.raises(RunDirError, match=rf"is in use by another run \(host .* pid {holder.pid};"):
            Trainer(micro_config(run_dir))
        CheckpointManager(run_dir, max_to_keep=None, save_interval_steps=1).close()  # a reader
        assert in_flight.is_dir()  # the live writer's save is not "uncommitted"
        argv = ["--config=configs/tiny.py", f"--config.run_dir={run_dir}"]
        assert main_mod.main(argv) == 1
        assert f"pid {holder.pid}" in one_line(capsys.readouterr().err)
    finally:
        holder.kill()
        holder.wait()
    m = CheckpointManager(run_dir, max_to_keep=None, save_interval_steps=1)  # stale: taken over
    assert not in_flight.exists()
    m.close()


# 4 ------------------------------------------------------------------------------------------
def test_corrupt_latest_steps_are_skipped_moved_aside_and_recomputed(run_copy, trained):
    damage(rundir.step_dir(run_copy, 8))
    (rundir.step_dir(run_copy, 7) / rundir.DATA / rundir.DATA_FILE).unlink()
    with pytest.raises(ResumeError, match=r"checkpoint.resume_step=8: .*checkpoint_000008 does not restore: "):
        Trainer(micro_config(run_copy, max_steps=STEPS, ckpt_freq=1, **{"checkpoint.resume_step": 8})).restore()
    trainer = Trainer(micro_config(run_copy, max_steps=STEPS, ckpt_freq=1))
    assert trainer.run() == 0
    log = (run_copy / "logs" / "train.log").read_text()
    assert "skipped checkpoint step 7" in log and "position.json" in log
    assert "skipped checkpoint step 8" in log
    assert sorted(p.name for p in rundir.broken_dir(run_copy).iterdir()) == ["checkpoint_000007",
                                                                            "checkpoint_000008"]
    assert steps_of(run_copy) == list(range(1, STEPS + 1))
    assert_same_state(rundir.step_dir(run_copy, STEPS), rundir.step_dir(trained, STEPS))


def test_tools_name_what_is_broken(run_copy, tmp_path, capsys):
    from conversion import to_pytorch
    from tttjax import verify

    step = rundir.step_dir(run_copy, STEPS)
    (step / rundir.CONSOLIDATED / rundir.CONFIG_FILE).write_text("{garbled")
    assert verify.main(["--checkpoint_dir", str(step)]) == 1
    out = capsys.readouterr().out
    assert "Traceback" not in out and f"{rundir.CONFIG_FILE}: invalid JSON" in out
    damage(step)
    assert to_pytorch.main(["--checkpoint_dir", str(step), "--out", str(tmp_path / "export")]) == 1
    assert f"error: {step / rundir.STATE}: " in one_line(capsys.readouterr().err)


# 5 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [("batch_size", 8), ("duration_sec", 2.56), ("data.train_data", "synthetic:32"),
                                       ("data.shuffle", False), ("num_microbatches", 2)])
def test_changed_data_stream_is_refused_by_name(run_copy, key, value):
    with pytest.raises(ResumeError, match=rf"data stream of checkpoint step {STEPS} does not match the config: "
                                            rf"{key}: saved .*allow_data_change=true"):
        Trainer(micro_config(run_copy, **{key: value})).restore()


def test_allowed_data_change_continues_after_the_examples_seen(run_copy):
    free = Trainer(micro_config(run_copy, max_steps=20, num_ckpt_keep=2, ckpt_freq=3, **{"optim.lr": 1e-4}))
    assert free.restore() == STEPS  # lr, num_ckpt_keep, ckpt_freq, max_steps: free
    allowed = Trainer(micro_config(run_copy, batch_size=8, **{"checkpoint.allow_data_change": True}))
    assert allowed.restore() == STEPS
    assert allowed.start_example == STEPS * 4  # the old batch size's examples, not STEPS * 8
    assert any("batch_size: saved 4 vs config 8" in n for n in allowed.notes)


# 6 ------------------------------------------------------------------------------------------
def test_garbled_shard_is_named_mid_run_and_by_verify(tmp_path, capsys):
    from tttjax.data import make_batch_iterator, make_dataset, prepare

    codes = np.random.default_rng(0).integers(0, 16, size=(8, 17, 16))
    np.save(tmp_path / "codes.npy", codes)
    out = tmp_path / "data"
    prepare.main(["--codes", str(tmp_path / "codes.npy"), "--out", str(out), "--duration_sec", "1.28",
                  "--text_card", "16", "--files_per_shard", "1"])
    prepare.main(["--verify", str(out)])  # intact: passes
    shard = next(out.glob("*.array_record"))
    data = bytearray(shard.read_bytes())
    data[1024:1280] = bytes(range(256))  # same size, garbled inside the records
    shard.write_bytes(bytes(data))
    dataset = make_dataset(str(out), num_frames=16, card=16, text_card=16, n_q=16, seed=0)  # sizes still match
    with pytest.raises(ValueError, match=rf"{shard}: record \d+ is unreadable .* --verify {out}"):
        next(make_batch_iterator(dataset, global_batch_size=8, start_step=0, seed=0, shuffle=False))
    assert prepare.main(["--verify", str(out)]) == 1
    assert re.search(rf"error: prepare: {re.escape(str(shard))}: sha256 differs", capsys.readouterr().err)


# 7 ------------------------------------------------------------------------------------------
def test_run_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    from tttjax import main as main_mod

    (tmp_path / "file").write_text("")
    assert main_mod.main(["--config=configs/tiny.py", f"--config.run_dir={tmp_path / 'file'}"]) == 1
    assert f"run_dir {tmp_path / 'file'}: not a writable directory ([Errno 17]" in one_line(capsys.readouterr().err)


def test_disk_full_while_saving_keeps_the_previous_steps(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path, max_to_keep=None, save_interval_steps=1)
    state = {"w": jax.numpy.ones((4, 4))}
    assert m.save(1, state, {"next_step": 1}, ({"w": np.ones(2)}, {}, "lora.safetensors"))
    m.wait_until_finished()

    def full(directory, args):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / args.filename))

    monkeypatch.setattr(consolidated_mod, "_write", full)
    m.save(2, state, {"next_step": 2}, ({"w": np.ones(2)}, {}, "lora.safetensors"))
    with pytest.raises(CheckpointError, match=r"saving checkpoint step 2 .* failed: \[Errno 28\] No space left on "
                                              r"device: .*lora.safetensors.* steps \[1\] are intact"):
        m.wait_until_finished()
    m.close()
    m = CheckpointManager(tmp_path, max_to_keep=None, save_interval_steps=1)
    assert m.all_steps() == [1]
    m.restore(1, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
    m.close()


DISK_FILLS_AT_THE_SECOND_SAVE = """
import errno, sys
from tttjax.checkpoint import consolidated
real, calls = consolidated._write, []
def full(directory, args):
    calls.append(1)
    if len(calls) >= 2:
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / args.filename))
    return real(directory, args)
consolidated._write = full
from tttjax.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_disk_full_during_training_is_one_line_naming_the_failed_step(tmp_path):
    """The save of step 2 fails in Orbax's background threads; the run stops at its next save (step 3)
    with one line naming step 2, and the threads' tracebacks stay in train.log."""
    script = tmp_path / "train_until_the_disk_fills.py"
    script.write_text(DISK_FILLS_AT_THE_SECOND_SAVE)
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, str(script), *micro.cli(max_steps=6, batch_size=4, duration_sec=1.28,
                                                                   ckpt_freq=1, eval_freq=0),
                           f"--config.run_dir={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"})
    err = done.stderr.strip()
    assert done.returncode == 1 and "\n" not in err, err
    assert re.fullmatch(r"error: saving checkpoint step 2 in \S+ failed: \[Errno 28\] No space left on device: "
                        r"\S+lora.safetensors' \(the committed steps \[1\] are intact\)", err), err
    assert "Traceback" in (run_dir / "logs" / "train.log").read_text()  # the log keeps the threads' reports
    assert steps_of(run_dir) == [1]


def test_unwritable_outputs_and_empty_codes_are_one_line_before_any_work(trained, tmp_path, capsys):
    from tttjax import forward
    from tttjax.eval import __main__ as eval_main

    step = str(rundir.step_dir(trained, STEPS))
    (tmp_path / "file").write_text("")
    np.save(tmp_path / "empty.npy", np.zeros((0, 17, 16), np.int32))
    blocked = str(tmp_path / "file" / "out.json")
    assert eval_main.main(["--checkpoint_dir", "/nonexistent", "--output_json", blocked]) == 1  # before loading
    assert f"--output_json={blocked}: cannot write it ([Errno 17] File exists)" in one_line(capsys.readouterr().err)
    assert forward.main(["--checkpoint_dir", "/nonexistent", "--codes", "x.npy", "--out", blocked]) == 1
    assert f"--out={blocked}: cannot write it" in one_line(capsys.readouterr().err)
    for run in (lambda: forward.main(["--checkpoint_dir", step, "--codes", str(tmp_path / "empty.npy"),
                                      "--out", str(tmp_path / "o.npz")]),
                lambda: eval_main.main(["--checkpoint_dir", step, "--data", str(tmp_path / "empty.npy"),
                                        "--no_ttt_verify"])):
        assert run() == 1
        assert "empty.npy: codes are empty (shape (0, 17, 16))" in one_line(capsys.readouterr().err)


# acceptance ---------------------------------------------------------------------------------
MICRO_CLI = micro.cli(max_steps=STEPS, batch_size=4, duration_sec=1.28, log_freq=1, ckpt_freq=1, num_ckpt_keep=None,
                      data__train_data="synthetic:64", data__eval_data="synthetic:8", eval_freq=0)  # ckpt every step


def test_chaos_kill_term_and_truncation_end_bitwise_equal(trained, tmp_path):
    """SIGKILL, then SIGTERM, at random committed steps; between restarts the latest step's largest
    files are truncated. The run skips it, recomputes it and ends as the uninterrupted run."""
    seed = int(time.time())
    rng = np.random.default_rng(seed)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "tttjax.main", *MICRO_CLI, f"--config.run_dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    for sig in (signal.SIGKILL, signal.SIGTERM):
        before = max(steps_of(run_dir), default=0)
        # at least two new steps: the damaged latest one always has an intact step before it (with
        # none, the run refuses rather than start over: ResumeError "no checkpoint ... restores")
        target = min(before + int(rng.integers(2, 4)), STEPS)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        while not rundir.step_dir(run_dir, target).is_dir():
            assert proc.poll() is None, f"seed {seed}: " + proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout=120)
        proc.stderr.close()
        damage(rundir.step_dir(run_dir, steps_of(run_dir)[-1]))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped checkpoint step" in (run_dir / "logs" / "train.log").read_text()
    assert steps_of(run_dir) == list(range(1, STEPS + 1))
    assert_same_state(rundir.step_dir(run_dir, STEPS), rundir.step_dir(trained, STEPS))
