"""Checkpoint tests that need their own processes: 8 fake devices, 2 processes, SIGTERM, SIGKILL.

Run as a script, this file is the child (`python test_checkpoint_subprocess.py MODE RUN_DIR [PID PORT]`).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIG = (2048, 4096)  # 32 MiB of float32 random data: a state whose write is not instant
INTERVAL = 5  # the fake loop's ckpt_freq


def big_array(step: int):
    import numpy as np

    return np.random.default_rng(step).standard_normal(BIG, dtype=np.float32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def child(mode: str, run_dir: str, pid: str = "0", port: str = "") -> None:
    if mode == "reshard":
        return child_reshard(run_dir)
    import jax

    # Even for one process: without a distributed client there is no preemption notice.
    n = 2 if mode == "twoproc" else 1
    jax.distributed.initialize(f"localhost:{port or free_port()}", num_processes=n, process_id=int(pid))
    {"preempt": child_preempt, "kill": child_kill, "twoproc": child_twoproc}[mode](run_dir)


def child_preempt(run_dir: str) -> None:
    """A fake training loop: save every INTERVAL steps; on preemption save, wait, exit 0."""
    import jax.numpy as jnp

    from tttjax.checkpoint import CheckpointManager

    m = CheckpointManager(run_dir, max_to_keep=None, save_interval_steps=INTERVAL)
    state = {"w": jnp.zeros(4), "step": jnp.int32(0)}
    for step in range(1, 100_000):
        state = {"w": state["w"] + 1, "step": jnp.int32(step)}
        if step == 2:
            (Path(run_dir) / "READY").touch()
        preempted = m.reached_preemption(step)
        if preempted or m.should_save(step):
            m.save(step, state, {"next_index": step}, force=preempted)
        if preempted:
            m.close()
            print(f"PREEMPTED {step}", flush=True)
            sys.exit(0)
        time.sleep(0.01)
    sys.exit(3)


def child_kill(run_dir: str) -> None:
    """Commits step 1, then starts step 2 whose export blocks forever (the parent SIGKILLs us)."""
    import threading

    import jax.numpy as jnp

    from tttjax.checkpoint import CheckpointManager, consolidated

    m = CheckpointManager(run_dir, max_to_keep=None, save_interval_steps=1)
    m.save(1, {"w": jnp.asarray(big_array(1))}, {"next_index": 1})
    m.wait_until_finished()

    def stuck(directory, args):
        (directory / "partial.safetensors").write_bytes(b"\0" * 1024)
        (Path(run_dir) / "WRITING").touch()
        threading.Event().wait()

    consolidated._write = stuck
    export = ({"x": big_array(2)}, {}, "consolidated.safetensors")
    m.save(2, {"w": jnp.asarray(big_array(2))}, {"next_index": 2}, export)
    threading.Event().wait()


def child_twoproc(run_dir: str) -> None:
    """Both processes save one global array and the same export; only process 0 may write it."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from tttjax.checkpoint import CheckpointManager

    mesh = Mesh(np.array(jax.devices()), ("data",))
    w = np.arange(8 * 4, dtype=np.float32).reshape(8, 4)
    arr = jax.make_array_from_callback(w.shape, NamedSharding(mesh, P("data")), lambda idx: w[idx])
    m = CheckpointManager(run_dir, max_to_keep=None, save_interval_steps=1)
    export = ({"w": w}, {"writer": jax.process_index()}, "consolidated.safetensors")
    assert m.save(1, {"w": arr}, {"next_index": 1}, export)
    m.close()


def child_reshard(run_dir: str) -> None:
    """Saves on a 2x2 mesh of 4 devices; restores onto 8 devices and onto one device."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
    from jax.sharding import PartitionSpec as P

    from tttjax.checkpoint import CheckpointManager

    devices = jax.devices()
    assert len(devices) == 8, devices
    w, b = np.arange(64 * 32, dtype=np.float32).reshape(64, 32), np.arange(16, dtype=np.int32)
    mesh4 = Mesh(np.array(devices[:4]).reshape(2, 2), ("data", "fsdp"))
    state = {
        "w": jax.device_put(w, NamedSharding(mesh4, P("data", "fsdp"))),
        "b": jax.device_put(b, NamedSharding(mesh4, P(None))),
    }
    m = CheckpointManager(run_dir, max_to_keep=None, save_interval_steps=1)
    m.save(1, state, {"next_index": 1})
    m.close()

    mesh8 = Mesh(np.array(devices).reshape(1, 8), ("data", "tensor"))
    targets = [
        {"w": NamedSharding(mesh8, P(None, "tensor")), "b": NamedSharding(mesh8, P("tensor"))},
        {"w": SingleDeviceSharding(devices[7]), "b": SingleDeviceSharding(devices[7])},
    ]
    m = CheckpointManager(run_dir, max_to_keep=None, save_interval_steps=1)
    for shardings, w_shard in zip(targets, [(64, 4), (64, 32)]):
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
                    for k, v in state.items()}
        restored, data = m.restore(-1, abstract)
        assert data == {"next_index": 1}
        for k, want in (("w", w), ("b", b)):
            assert restored[k].sharding == shardings[k], (k, restored[k].sharding)
            np.testing.assert_array_equal(np.asarray(restored[k]), want)
        assert {s.data.shape for s in restored["w"].addressable_shards} == {w_shard}
    m.close()
    print("RESHARD OK", flush=True)


# ---------------------------------------------------------------- parent side (pytest)


def spawn(mode: str, run_dir: Path, *args: str, **env) -> subprocess.Popen:
    """Starts a child with its stdout/stderr in files next to `run_dir` (pipes could fill up)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **env}
    log = run_dir.parent / "-".join((mode, *args[:1]))
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        cmd = [sys.executable, __file__, mode, str(run_dir), *args]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
    proc.log = log
    return proc


def output(proc: subprocess.Popen, stream: str = "out") -> str:
    return Path(f"{proc.log}.{stream}").read_text()


def wait_for(proc: subprocess.Popen, marker: Path, timeout: float = 90) -> None:
    """Waits until the child creates `marker`; fails if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            err = output(proc, "err")[-3000:]
            raise AssertionError(f"child exited {proc.returncode} before {marker.name}: {err}")
        assert time.monotonic() < deadline, f"no {marker.name} after {timeout}s"
        time.sleep(0.05)


def test_restore_onto_other_meshes(tmp_path):
    run_dir = tmp_path / "run"
    proc = spawn("reshard", run_dir, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    assert proc.wait(timeout=120) == 0, output(proc, "err")[-3000:]
    assert "RESHARD OK" in output(proc)


def test_two_processes_one_export_then_restore_in_one(tmp_path):
    import jax
    import numpy as np
    import safetensors.numpy

    from tttjax.checkpoint import CheckpointManager
    from tttjax.rundir import step_dir

    run_dir, port = tmp_path / "run", str(free_port())
    procs = [spawn("twoproc", run_dir, str(pid), port) for pid in (0, 1)]
    try:
        for p in procs:
            assert p.wait(timeout=120) == 0, output(p, "err")[-3000:]
    finally:
        for p in procs:
            p.kill()
    export = step_dir(run_dir, 1) / "consolidated"
    assert json.loads((export / "config.json").read_text()) == {"writer": 0}
    w = np.arange(8 * 4, dtype=np.float32).reshape(8, 4)
    np.testing.assert_array_equal(safetensors.numpy.load_file(export / "consolidated.safetensors")["w"], w)
    m = CheckpointManager(run_dir, max_to_keep=None, save_interval_steps=1)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state, data = m.restore(1, {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=sharding)})
    np.testing.assert_array_equal(np.asarray(state["w"]), w)
    assert data == {"next_index": 1}
    m.close()


def test_sigterm_saves_at_sync_step_and_exits_0(tmp_path):
    import jax.numpy as jnp

    from tttjax.checkpoint import CheckpointManager

    run_dir = tmp_path / "run"
    proc = spawn("preempt", run_dir)
    try:
        wait_for(proc, run_dir / "READY")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, output(proc, "err")[-3000:]
    finally:
        proc.kill()
    sync_step = int(output(proc).split("PREEMPTED")[1])
    m = CheckpointManager(run_dir, max_to_keep=None, save_interval_steps=INTERVAL)
    assert m.latest_step() == sync_step > 2
    assert all(s % INTERVAL == 0 for s in m.all_steps()[:-1])
    state, data = m.restore(None, {"w": jnp.zeros(4), "step": jnp.int32(0)})  # arrays work as targets too
    assert int(state["step"]) == sync_step and float(state["w"][0]) == sync_step
    assert data == {"next_index": sync_step}
    m.close()


def test_sigkill_during_async_save_keeps_previous(tmp_path):
    import jax
    import numpy as np

    from tttjax.checkpoint import CheckpointManager
    from tttjax.rundir import step_dir

    run_dir = tmp_path / "run"
    proc = spawn("kill", run_dir)
    try:
        wait_for(proc, run_dir / "WRITING")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
    ckpts = run_dir / "checkpoints"
    partial = "checkpoint_000002.orbax-checkpoint-tmp"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint_000001", partial]
    m = CheckpointManager(run_dir, max_to_keep=None, save_interval_steps=1)
    assert [p.name for p in ckpts.iterdir()] == ["checkpoint_000001"]  # the partial step is gone
    assert m.all_steps() == [1]
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state, data = m.restore(-1, {"w": jax.ShapeDtypeStruct(BIG, np.float32, sharding=sharding)})
    np.testing.assert_array_equal(np.asarray(state["w"]), big_array(1))
    assert data == {"next_index": 1}
    assert m.save(2, {"w": state["w"]}, {"next_index": 2})  # the step can be saved again
    m.close()
    assert step_dir(run_dir, 2).is_dir()


if __name__ == "__main__":
    child(*sys.argv[1:])
