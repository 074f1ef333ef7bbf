"""The training loop and its checkpoints: exact resume, resume_step, init_state_dir, refusals, NaN stop."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import micro
import numpy as np
import pytest

from configs import tiny
from tttjax import data as data_lib
from tttjax.checkpoint import CheckpointManager
from tttjax.checkpoint.resume import ResumeError
from tttjax.train.loop import Trainer, TrainingError

REPO = Path(__file__).resolve().parents[1]


def micro_config(run_dir, **changes):
    """configs/tiny.py shrunk to the micro model (tests/micro.py), with `changes` by dotted key."""
    c = tiny.get_config()
    c.run_dir = str(run_dir)
    c.max_steps = 6
    c.batch_size = 4
    c.duration_sec = 1.28  # 16 frames
    c.log_freq = 1
    c.ckpt_freq = 2
    c.num_ckpt_keep = None
    c.data.train_data = "synthetic:64"
    c.evals.standard.data = "synthetic:8"
    c.evals.standard.freq = 0
    c.checkpoint.async_save = True
    for key, value in {**micro.MODEL, **changes}.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_trees_equal(a, b):
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def adam_moments(opt_state):
    found = [np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]
             if ".mu" in jax.tree_util.keystr(path)]
    assert found
    return found


def interrupt_after(monkeypatch, num_batches):
    """Make the data iterator raise after `num_batches` batches: a crash in the middle of a run."""
    real = data_lib.make_batch_iterator

    def crashing(*args, **kwargs):
        it = real(*args, **kwargs)
        for _ in range(num_batches):
            yield next(it)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(data_lib, "make_batch_iterator", crashing)


@pytest.mark.parametrize("full", [False, True])
def test_resume_is_bitwise_identical(tmp_path, monkeypatch, full):
    straight = Trainer(micro_config(tmp_path / "a", full_finetuning=full))
    assert straight.run() == 0

    config = micro_config(tmp_path / "b", full_finetuning=full)
    interrupt_after(monkeypatch, 5)  # steps 1..5 run; checkpoints 2 and 4 are committed
    with pytest.raises(KeyboardInterrupt):
        Trainer(config).run()
    monkeypatch.undo()
    assert CheckpointManager(config.run_dir, max_to_keep=None, save_interval_steps=2).all_steps() == [2, 4]
    resumed = Trainer(config)
    assert resumed.restore() == 4
    resumed = Trainer(config)
    assert resumed.run() == 0

    assert int(resumed.state.step) == int(straight.state.step) == 6
    assert_trees_equal(resumed.state, straight.state)
    a_steps = CheckpointManager(tmp_path / "a", max_to_keep=None, save_interval_steps=2)
    b_steps = CheckpointManager(tmp_path / "b", max_to_keep=None, save_interval_steps=2)
    assert a_steps.all_steps() == b_steps.all_steps() == [2, 4, 6]
    exported = tmp_path / "a" / "checkpoints" / "checkpoint_000006" / "consolidated"
    name = "consolidated.safetensors" if full else "lora.safetensors"
    assert (exported / name).is_file() and (exported / "config.json").is_file()
    from safetensors.numpy import load_file

    a = load_file(str(exported / name))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "checkpoint_000006" / "consolidated" / name))
    assert list(a) == sorted(a) and a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    if not full:  # adapters only: LoRA and TTT tensors, nothing of the frozen base
        assert all(".lora_" in k or "seq_modeling_block" in k for k in a)
        assert any("seq_modeling_block" in k for k in a)


def test_resume_step_and_init_state_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative run_dir, as users type it
    first = Trainer(micro_config("a"))
    first.run()
    # resume_step picks an older checkpoint; the run continues from there to the same end.
    import shutil

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    again = Trainer(micro_config(tmp_path / "b", **{"checkpoint.resume_step": 2}))
    assert again.restore() == 2
    again = Trainer(micro_config(tmp_path / "b", **{"checkpoint.resume_step": 2}))
    again.run()
    assert_trees_equal(again.state.params, first.state.params)

    # init_state_dir: weights from step 4 of run a, fresh optimizer, step 0.
    step_dir = tmp_path / "a" / "checkpoints" / "checkpoint_000004"
    fresh = Trainer(micro_config(tmp_path / "c", **{"checkpoint.init_state_dir": str(step_dir)}))
    assert fresh.restore() == 0
    manager = CheckpointManager(tmp_path / "a", max_to_keep=None, save_interval_steps=2)
    saved, _ = manager.restore(4, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), first.state))
    assert_trees_equal(fresh.state.params, saved.params)
    assert int(fresh.state.step) == 0
    assert all(not np.any(x) for x in adam_moments(fresh.state.opt_state))
    assert any(np.any(x) for x in adam_moments(saved.opt_state))


def test_refuses_other_architecture_and_existing_run(tmp_path):
    Trainer(micro_config(tmp_path / "a", max_steps=2)).run()
    with pytest.raises(ValueError, match=r"architecture.lora_rank: saved 2 vs config 4.*"
                                         r"architecture.ttt_layers: saved \[1\] vs config \[2\]"):
        Trainer(micro_config(tmp_path / "a", **{"lora.rank": 4, "ttt.layers": "2"})).restore()
    with pytest.raises(ResumeError, match="already has checkpoints"):
        Trainer(micro_config(tmp_path / "a", **{"checkpoint.resume": "never"})).restore()
    with pytest.raises(ResumeError, match="frozen base weights differ"):
        Trainer(micro_config(tmp_path / "a", seed=1)).restore()


def test_nan_loss_stops_without_saving(tmp_path):
    trainer = Trainer(micro_config(tmp_path / "a", ckpt_freq=1))
    trainer.frozen["text_emb"] = trainer.frozen["text_emb"] * np.nan  # a corrupted base weight
    with pytest.raises(TrainingError, match=r"non-finite loss, gradient norm or parameters at step 1 .*; not saved; "
                                            r"there is no checkpoint yet, so a re-run starts over"):
        trainer.run()
    assert CheckpointManager(tmp_path / "a", max_to_keep=None, save_interval_steps=1).all_steps() == []


def test_startup_memory_check_uses_the_compiled_step(tmp_path, monkeypatch):
    """Where the device reports its memory (TPU, GPU), the start-up check compiles the step and uses
    the compiler's own figures; the trainer then runs that compiled program, bitwise as the jitted
    step does. (On CPU the device reports no limit; the test gives it one.)"""
    from tttjax.analysis import memory

    monkeypatch.setattr(memory, "device_memory_bytes", lambda device=None: 1 << 20)
    with pytest.raises(ValueError, match=r"of 1.0 MiB of device memory \(the compiled step's memory_analysis\) does not fit"):
        Trainer(micro_config(tmp_path / "small", max_steps=2))
    monkeypatch.setattr(memory, "device_memory_bytes", lambda device=None: 1 << 40)
    checked = Trainer(micro_config(tmp_path / "a", max_steps=2, ckpt_freq=0))
    assert checked.program.compiled is not None
    checked.run()
    monkeypatch.undo()
    plain = Trainer(micro_config(tmp_path / "b", max_steps=2, ckpt_freq=0))
    assert plain.program.compiled is None
    plain.run()
    assert_trees_equal(checked.state.params, plain.state.params)


def test_a_saved_executable_is_reused_and_refused_when_it_is_not_this_run(tmp_path):
    """The step compiled and serialized once (as tttjax.compile --save_executable writes it) is what a
    run with compiled_step loads and runs, bitwise as a run that compiles; a run whose batch or
    program differs is refused in one line."""
    from tttjax.train import executable
    from tttjax.train.program import build_program

    program = build_program(micro_config(tmp_path / "unused", max_steps=2))  # max_steps: the LR schedule is in the step
    lowered = program.lower()
    with executable.fresh_compile():
        compiled = lowered.compile()
    executable.save(tmp_path / "exe", program, lowered, compiled)
    loaded = Trainer(micro_config(tmp_path / "a", max_steps=2, ckpt_freq=0, compiled_step=str(tmp_path / "exe")))
    assert loaded.program.compiled is not None  # loaded at start-up, never compiled
    loaded.run()
    plain = Trainer(micro_config(tmp_path / "b", max_steps=2, ckpt_freq=0))
    plain.run()
    assert_trees_equal(loaded.state.params, plain.state.params)
    log = (tmp_path / "a" / "logs" / "train.log").read_text()
    assert "frames_per_s_per_chip=" in log and "mfu=" not in log  # a CPU has no entry in chips.py

    with pytest.raises(executable.ExecutableMismatch, match=r"compiled for batch \[4, 17, 16\], this run has \[8, 17, 16\]"):
        Trainer(micro_config(tmp_path / "c", batch_size=8, compiled_step=str(tmp_path / "exe")))
    with pytest.raises(executable.ExecutableMismatch, match="another program"):
        Trainer(micro_config(tmp_path / "d", text_padding_weight=0.25, compiled_step=str(tmp_path / "exe")))
    # a step compiled with other XLA options (windowed_einsum=false on TPU) is another program too
    manifest = json.loads((tmp_path / "exe" / "manifest.json").read_text())
    assert manifest["compiler_options"] == {}
    manifest["compiler_options"] = {"xla_tpu_enable_windowed_einsum_for_all_gather": False}
    (tmp_path / "exe" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(executable.ExecutableMismatch, match="compiled for compiler_options"):
        Trainer(micro_config(tmp_path / "f", compiled_step=str(tmp_path / "exe")))
    with pytest.raises(executable.ExecutableMismatch, match="manifest.json not found"):
        Trainer(micro_config(tmp_path / "e", compiled_step=str(tmp_path / "missing")))


def test_microbatches_average_gradients(tmp_path):
    """num_microbatches=2 == the mean of the two half-batch gradients (moshi-finetune's accumulation)."""
    import jax.numpy as jnp

    trainer = Trainer(micro_config(tmp_path / "a", num_microbatches=2))
    codes = next(trainer._batches(0))
    from tttjax.train.step import make_loss_fn

    loss_fn = make_loss_fn(trainer.program.graphdef, trainer.cfg, text_padding_weight=0.5,
                           first_codebook_weight_multiplier=1.0)
    grad = jax.jit(jax.grad(lambda p, c: loss_fn(p, trainer.frozen, c)[0]))
    params = trainer.state.params
    want = jax.tree.map(lambda a, b: (a + b) / 2, grad(params, codes[:2]), grad(params, codes[2:]))
    _, metrics = trainer.program.step(jax.tree.map(jnp.copy, trainer.state), trainer.frozen, codes)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(jnp.sqrt(sum(jnp.sum(g * g)
                                                                  for g in jax.tree.leaves(want)))), rtol=1e-5)


def test_sigterm_and_ctrl_c_save_at_a_step_and_relaunch_resumes(tmp_path):
    """The real launcher: SIGTERM -> checkpoint at the agreed step, exit 0, "preempted" on the console;
    Ctrl-C (SIGINT) the same with exit 130 and "interrupted"; the same command resumes."""
    run_dir = tmp_path / "run"
    def cmd(max_steps):
        return [sys.executable, "-m", "tttjax.main", "--config=configs/tiny.py", f"--config.run_dir={run_dir}",
                f"--config.max_steps={max_steps}", "--config.ckpt_freq=0", "--config.log_freq=1", "--config.eval_freq=0",
                "--config.model.dim=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
                "--config.model.depformer_dim=16", "--config.model.depformer_num_layers=1",
                "--config.model.depformer_dim_feedforward=64", "--config.duration_sec=1.28",
                "--config.batch_size=2", "--config.ttt.layers=1"]

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = run_dir / "logs" / "train.log"
    saved = 0
    for sig, code, word in ((signal.SIGTERM, 0, "preempted"), (signal.SIGINT, 130, "interrupted")):
        proc = subprocess.Popen(cmd(3000), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.time() + 240
        while time.time() < deadline and not (log.exists() and f"step {saved + 3} " in log.read_text()):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.2)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err[-2000:]
        steps = CheckpointManager(run_dir, max_to_keep=None, save_interval_steps=0).all_steps()
        assert steps[-1] >= saved + 3 and steps[-1] < 3000
        saved = steps[-1]
        last = out.strip().splitlines()[-1]
        assert last.startswith(f"{word} at step {saved} of 3000: saved step {saved}; re-run the same command"), last
        assert "Traceback" not in err, err[-2000:]
    # Relaunch: resumes from the saved step (a shorter max_steps keeps the test fast).
    done = subprocess.run(cmd(saved + 2), cwd=REPO, env=env, capture_output=True, timeout=240)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert f"start at step {saved}/" in log.read_text()
