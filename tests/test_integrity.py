"""Checkpoint integrity (issue 28): the digests of a step's arrays, a bit flipped inside a chunk that
still decompresses, read errors that are the storage's (retried, then a stop with nothing moved)
rather than the step's, and a run whose every step is damaged."""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_faults import damage, steps_of
from test_train import micro_config

from tttjax import rundir
from tttjax.checkpoint import manager as manager_mod
from tttjax.checkpoint.manager import CheckpointIOError, is_io_error
from tttjax.checkpoint.resume import ResumeError
from tttjax.train.loop import Trainer

REPO = Path(__file__).resolve().parents[1]
STEPS = 3  # the trained run: a checkpoint at every step

DIGEST_CHILD = textwrap.dedent("""
    import jax, ml_dtypes, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from tttjax.checkpoint import digests
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rng = np.random.default_rng(0)
    values = {"w": rng.standard_normal((8, 12, 6)).astype(np.float32),
              "b": rng.standard_normal((16, 4)).astype(ml_dtypes.bfloat16),
              "n": np.int32(7), "m": np.arange(5, dtype=np.uint8) > 2}

    def reference(x):  # the definition itself, element by element, in uint64
        b = np.ascontiguousarray(x).view(f"u{x.dtype.itemsize}").astype(np.uint64).ravel()
        i = np.arange(b.size, dtype=np.uint64)
        j = np.arange(b.size, dtype=np.uint64).reshape(np.shape(x), order="F").ravel()
        return int(((2 * i + 1) * b).sum(dtype=np.uint64)) & digests.MASK, \\
            int(((2 * j + 1) * b).sum(dtype=np.uint64)) & digests.MASK

    layouts = [{"w": P(None, "fsdp", "tensor"), "b": P(("data", "fsdp")), "n": P(), "m": P()},
               {"w": P("data"), "b": P(None, "tensor"), "n": P(), "m": P()}]
    for specs in layouts:
        state = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in values.items()}
        host, device = digests.start(state, on_device=False).result(), digests.start(state, on_device=True).result()
        assert host == device, (host, device)
        assert len(host["w"]["shards"]) == 8 and len({json.dumps(s["index"]) for s in host["w"]["shards"]}) > 1
        for k, v in values.items():
            assert digests._total(host[k]["shards"]) == reference(np.asarray(v)), k
    print("DIGESTS OK")
""")


def test_digests_are_the_definition_on_any_sharding():
    """Host (numpy, marginal sums) and device (XLA) digests equal the element-by-element definition
    and each other, for float32, bfloat16, int32, bool, scalars and replicated arrays, on two
    shardings of 8 devices: shard digests add up to the array's whatever the sharding."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", "import json\n" + DIGEST_CHILD], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and "DIGESTS OK" in done.stdout, done.stderr[-3000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("integrity") / "run"
    assert Trainer(micro_config(run_dir, max_steps=STEPS, ckpt_freq=1)).run() == 0
    assert steps_of(run_dir) == [1, 2, 3]
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def stored_state(step: Path) -> list[np.ndarray]:
    """The step's state as plain Orbax restores it: no digests, no checks."""
    with ocp.PyTreeCheckpointer() as ckptr:
        import jax

        return [np.asarray(x) for x in jax.tree.leaves(ckptr.restore(step / rundir.STATE))]


def flip_a_bit_that_still_restores(step: Path) -> str:
    """Flips one bit inside a data file of the step's state, choosing the first place where Orbax
    still restores every array (the chunk still decompresses) to different but finite values (a
    NaN would be caught without digests)."""
    before = stored_state(step)
    files = sorted((p for p in (step / rundir.STATE).rglob("*") if p.is_file() and p.parent.name == "d"),
                   key=lambda p: -p.stat().st_size)
    for path in files:
        original = path.read_bytes()
        for where in np.linspace(0.1, 0.9, 9):
            data = bytearray(original)
            data[int(len(data) * where)] ^= 0x10
            path.write_bytes(bytes(data))
            try:
                after = stored_state(step)
            except Exception:  # noqa: BLE001 - this flip breaks decompression: try another
                after = None
            if (after is not None and any(not np.array_equal(a, b) for a, b in zip(before, after))
                    and all(np.isfinite(a).all() for a in after if a.dtype.kind == "f")):
                return path.name
            path.write_bytes(original)
    raise AssertionError(f"no bit flip in {step} restores to other values")


def test_a_flipped_bit_that_still_decompresses_is_refused_by_name(run_copy, tmp_path):
    step = rundir.step_dir(run_copy, STEPS)
    flip_a_bit_that_still_restores(step)  # plain Orbax restores this step, silently wrong
    without_digests = tmp_path / "without"
    shutil.copytree(run_copy, without_digests)
    shutil.rmtree(rundir.step_dir(without_digests, STEPS) / rundir.DIGESTS)
    assert Trainer(micro_config(without_digests, max_steps=STEPS, ckpt_freq=1)).restore() == STEPS  # undetected

    trainer = Trainer(micro_config(run_copy, max_steps=STEPS, ckpt_freq=1))
    assert trainer.restore() == STEPS - 1  # the previous good one
    [note] = [n for n in trainer.notes if "skipped checkpoint step" in n]
    assert f"checkpoint_{STEPS:06d} does not match its digests: " in note
    assert "shard [" in note and "differs from its digest" in note  # the array by path, and its shard
    assert (rundir.broken_dir(run_copy) / f"checkpoint_{STEPS:06d}").is_dir()

    from tttjax import verify

    report = verify.verify(rundir.broken_dir(run_copy) / f"checkpoint_{STEPS:06d}")
    assert not report.ok and any("do not match the digest recorded" in d for d in report.different)
    assert verify.verify(rundir.step_dir(run_copy, STEPS - 1)).checked_digests > 0


class FlakyReads:
    """The Orbax restore of `step` fails `times` times with `error`, then reads."""

    def __init__(self, monkeypatch, step: int, times: int, error: Exception):
        self.calls, self.step, self.times, self.error = 0, step, times, error
        real = manager_mod._OrbaxManager.restore

        def restore(mngr, s, *args, **kwargs):
            if s == self.step:
                self.calls += 1
                if self.calls <= self.times:
                    raise self.error
            return real(mngr, s, *args, **kwargs)

        monkeypatch.setattr(manager_mod._OrbaxManager, "restore", restore)


IO_ERRORS = [OSError(errno.EIO, "Input/output error", "/nfs/ckpt/ocdbt.process_0/d/abc"),
             ValueError("UNAVAILABLE: Error reading \"params.w\" in OCDBT database: [OS error 110: timed out]"),
             PermissionError(errno.EACCES, "Permission denied", "/nfs/ckpt/_METADATA")]


@pytest.mark.parametrize("error", IO_ERRORS, ids=["EIO", "tensorstore-unavailable", "EACCES"])
def test_a_transient_read_error_is_retried_and_the_run_resumes_from_that_step(run_copy, monkeypatch, error):
    flaky = FlakyReads(monkeypatch, STEPS, 2, error)
    trainer = Trainer(micro_config(run_copy, max_steps=STEPS, ckpt_freq=1, **{"checkpoint.retry_wait_s": 0.01}))
    assert trainer.restore() == STEPS
    assert flaky.calls == 3 and not trainer.notes
    assert not rundir.broken_dir(run_copy).exists()


def test_a_persistent_read_error_stops_the_run_with_nothing_moved(run_copy, monkeypatch):
    FlakyReads(monkeypatch, STEPS, 100, IO_ERRORS[0])
    trainer = Trainer(micro_config(run_copy, max_steps=STEPS, ckpt_freq=1, **{"checkpoint.retry_wait_s": 0.01,
                                                                            "checkpoint.read_attempts": 3}))
    with pytest.raises(CheckpointIOError, match=rf"reading checkpoint step {STEPS} \(\S+checkpoint_00000{STEPS}\) "
                                                r"failed with an I/O error 3 times in \d+ s: \[Errno 5\] Input/output "
                                                r"error: .*; nothing was moved or changed"):
        trainer.restore()
    assert steps_of(run_copy) == [1, 2, 3] and not rundir.broken_dir(run_copy).exists()


def test_what_counts_as_the_storage_fault(tmp_path):
    step = tmp_path / "checkpoint_000001"
    step.mkdir()
    assert is_io_error(OSError(errno.EIO, "Input/output error"), step)
    assert is_io_error(TimeoutError("read timed out"), step)
    try:
        raise ValueError("restore failed") from ValueError("DEADLINE_EXCEEDED: GCS read")
    except ValueError as e:
        assert is_io_error(e, step)  # anywhere in the chain
    assert not is_io_error(FileNotFoundError(errno.ENOENT, "No such file", str(step / "data")), step)  # damage
    assert not is_io_error(ValueError("DATA_LOSS: Truncated Zstd-compressed stream"), step)
    assert not is_io_error(KeyError("key_metadata"), step)
    step.rmdir()  # the step dir itself gone: a lost mount, not a damaged step
    assert is_io_error(FileNotFoundError(errno.ENOENT, "No such file", str(step / "data")), step)


def test_every_step_damaged_is_refused_by_name_or_started_over(run_copy, trained):
    for s in range(1, STEPS + 1):
        damage(rundir.step_dir(run_copy, s))
    with pytest.raises(ResumeError, match=r"every checkpoint of \S+ is damaged \(persistent step 3: .*checkpoint_000003 "
                                          r"does not restore: .*; persistent step 1: .*\); nothing was moved\. To start "
                                          r"over .* --config.checkpoint.if_all_broken=start_over"):
        Trainer(micro_config(run_copy, max_steps=STEPS, ckpt_freq=1)).restore()
    assert steps_of(run_copy) == [1, 2, 3]

    again = Trainer(micro_config(run_copy, max_steps=STEPS, ckpt_freq=1, **{"checkpoint.if_all_broken": "start_over"}))
    assert again.run() == 0
    assert sorted(p.name for p in rundir.broken_dir(run_copy).iterdir()) == [f"checkpoint_00000{s}" for s in (1, 2, 3)]
    log = (run_copy / "logs" / "train.log").read_text()
    assert "starting over from the starting weights" in log and "start at step 0/3" in log
    assert stored_state(rundir.step_dir(run_copy, STEPS))[0].tobytes() == \
        stored_state(rundir.step_dir(trained, STEPS))[0].tobytes()  # the same run again, from scratch
    assert json.loads((rundir.step_dir(run_copy, STEPS) / rundir.DATA / rundir.DATA_FILE).read_text())["next_step"] == 3


def test_local_copies_need_both_keys():
    from tttjax.config import schema
    from tttjax.errors import ConfigError

    config = micro_config("unused", **{"checkpoint.local_dir": "/mnt/local"})
    with pytest.raises(ConfigError, match=r"checkpoint.local_dir='/mnt/local' and checkpoint.local_ckpt_freq=0 go "
                                          r"together"):
        schema.validate(config)
    config.checkpoint.local_ckpt_freq = 2
    schema.validate(config)
