"""In-process checkpoint tests (one CPU device); multi-device and signal tests are in
test_checkpoint_subprocess.py."""

import json
import struct
import threading

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy

from tttjax.checkpoint import CheckpointManager, check_compatible
from tttjax.checkpoint import consolidated as consolidated_mod
from tttjax.checkpoint.manager import restore_trainables
from tttjax.rundir import step_dir
from tttjax.weights.sources import OrbaxSource

META = {"ttt": {"layers": "1,5", "mini_batch_size": 16}, "lora": {"rank": 8}, "dims": (64, 4)}


def make_state(step: int) -> dict:
    """A train-state-like pytree whose values identify the step."""
    return {
        "params": {"w": jnp.full((4, 8), float(step)), "b": jnp.arange(8, dtype=jnp.bfloat16) + step},
        "opt": {"mu": jnp.full((4, 8), step / 10), "count": jnp.int32(step)},
        "step": jnp.int32(step),
        "rng": jax.random.key_data(jax.random.key(step)),
    }


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def run_saves(run_dir, steps, **kw) -> CheckpointManager:
    m = CheckpointManager(run_dir, metadata=META, **kw)
    for s in steps:
        if m.should_save(s):
            assert m.save(s, make_state(s), {"next_index": s})
    return m


def committed(run_dir) -> list[str]:
    """Names under checkpoints/ (committed step dirs, and Orbax tmp dirs if any)."""
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_interval_keep_n_and_names(tmp_path):
    m = run_saves(tmp_path, range(1, 10), max_to_keep=2, save_interval_steps=2)
    m.wait_until_finished()
    assert m.all_steps() == [6, 8]
    assert committed(tmp_path) == ["checkpoint_000006", "checkpoint_000008"]
    assert step_dir(tmp_path, 8) == tmp_path / "checkpoints" / "checkpoint_000008"
    assert sorted(p.name for p in step_dir(tmp_path, 8).iterdir() if p.is_dir()) == ["data", "digests", "state"]
    m.close()


def test_keep_all_and_final_only(tmp_path):
    m = run_saves(tmp_path / "all", range(1, 10), max_to_keep=None, save_interval_steps=2)
    m.close()
    assert m.all_steps() == [2, 4, 6, 8]
    # ckpt_freq = 0: nothing periodic, only the forced final save
    m = run_saves(tmp_path / "end", range(1, 10), max_to_keep=None, save_interval_steps=0)
    assert m.all_steps() == []
    assert m.save(9, make_state(9), {"next_index": 9}, force=True)
    m.close()
    assert committed(tmp_path / "end") == ["checkpoint_000009"]


def test_async_save_returns_before_commit(tmp_path, monkeypatch):
    """The consolidated write is held on a gate: `save` must return while the step is uncommitted."""
    gate, real_write = threading.Event(), consolidated_mod._write
    monkeypatch.setattr(consolidated_mod, "_write", lambda d, a: (gate.wait(60), real_write(d, a)))
    m = CheckpointManager(tmp_path, max_to_keep=None, save_interval_steps=1)
    export = ({"x": np.ones(3, np.float32)}, {}, "consolidated.safetensors")
    assert m.save(1, make_state(1), {"next_index": 1}, export)
    assert not step_dir(tmp_path, 1).exists()
    assert committed(tmp_path) == ["checkpoint_000001.orbax-checkpoint-tmp"]
    gate.set()
    m.wait_until_finished()
    assert committed(tmp_path) == ["checkpoint_000001"]
    state, data = m.restore(1, abstract(make_state(0)))
    assert_tree_equal(state, make_state(1))
    assert data == {"next_index": 1}
    m.close()


def test_failed_export_never_commits(tmp_path, monkeypatch):
    def boom(directory, args):
        raise OSError("disk full")

    monkeypatch.setattr(consolidated_mod, "_write", boom)
    m = CheckpointManager(tmp_path, max_to_keep=None, save_interval_steps=1)
    m.save(1, make_state(1), {"next_index": 1}, ({"x": np.ones(2)}, {}, "lora.safetensors"))
    with pytest.raises(Exception, match="disk full"):
        m.wait_until_finished()
    assert m.all_steps() == []
    assert not step_dir(tmp_path, 1).exists()
    m.close()


def test_consolidated_files(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {  # deliberately unsorted, mixed dtypes
        "transformer.layers.1.w": rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16),
        "depformer.emb.0.weight": rng.normal(size=(7,)).astype(np.float32),
        "transformer.layers.0.w": rng.normal(size=(2, 2)).astype(np.float32),
    }
    config = {"dim": 64, "lora": True, "ttt": {"layers": "1,5"}}
    m = CheckpointManager(tmp_path, max_to_keep=None, save_interval_steps=1)
    m.save(3, make_state(3), {"next_index": 3}, (tensors, config, "lora.safetensors"))
    m.close()
    d = step_dir(tmp_path, 3) / "consolidated"
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "lora.safetensors"} <= names and "consolidated.safetensors" not in names
    raw = (d / "lora.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    assert header.pop("__metadata__") == {"format": "pt"}
    assert list(header) == sorted(tensors)
    loaded = safetensors.numpy.load_file(str(d / "lora.safetensors"))
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype
        np.testing.assert_array_equal(loaded[k], v)
    assert json.loads((d / "config.json").read_text()) == config


def test_bad_export_name_or_data_is_refused(tmp_path):
    m = CheckpointManager(tmp_path, max_to_keep=None, save_interval_steps=1)
    with pytest.raises(ValueError, match="model.safetensors"):
        m.save(1, make_state(1), {}, ({"x": np.ones(2)}, {}, "model.safetensors"))
    with pytest.raises(TypeError, match="data_position of step 2 is not JSON-able"):
        m.save(2, make_state(2), {"next_index": np.int32(2)})
    assert m.save(3, make_state(3), {"next_index": 3})  # nothing was left half-started
    m.close()
    assert committed(tmp_path) == ["checkpoint_000003"]


def test_resume_step_and_partial_restore(tmp_path):
    m = run_saves(tmp_path, range(1, 7), max_to_keep=None, save_interval_steps=2)
    m.close()
    m = CheckpointManager(tmp_path, max_to_keep=None, save_interval_steps=2)  # a fresh start
    target = abstract(make_state(0))
    assert m.latest_step() == 6
    for asked, got in [(-1, 6), (None, 6), (4, 4)]:
        state, data = m.restore(asked, target)
        assert_tree_equal(state, make_state(got))
        assert data == {"next_index": got}
    with pytest.raises(FileNotFoundError, match=r"step 5 .*\[2, 4, 6\]"):
        m.restore(5, target)
    assert m.restore(2, None) == (None, {"next_index": 2})
    state, data = m.restore(2, target, data=False)
    assert data is None
    assert_tree_equal(state, make_state(2))
    m.close()


def test_existing_step_is_not_overwritten(tmp_path, caplog):
    m = CheckpointManager(tmp_path, max_to_keep=None, save_interval_steps=1)
    assert m.save(2, make_state(2), {"next_index": 2})
    m.wait_until_finished()
    assert not m.save(2, make_state(99), {"next_index": 99}, force=True)
    assert "step 2 already exists" in caplog.text
    m.close()
    m = CheckpointManager(tmp_path, max_to_keep=None, save_interval_steps=1)
    state, data = m.restore(2, abstract(make_state(0)))
    assert_tree_equal(state, make_state(2))
    assert data == {"next_index": 2}


def test_metadata_roundtrip_and_mismatch(tmp_path):
    m = run_saves(tmp_path, [1], max_to_keep=None, save_interval_steps=1)
    m.close()
    saved = CheckpointManager(tmp_path, max_to_keep=None, save_interval_steps=1).restore_metadata(-1)
    assert saved == json.loads(json.dumps(META))
    check_compatible(saved, META)  # tuples vs the saved lists are not a mismatch
    current = {"ttt": {"layers": "2", "mini_batch_size": 16}, "lora": {"rank": 16}, "dims": (64, 4), "new": 1}
    with pytest.raises(ValueError) as e:
        check_compatible(saved, current, source=str(step_dir(tmp_path, 1)))
    assert str(e.value) == (
        f"{step_dir(tmp_path, 1)} does not match the config: lora.rank: saved 8 vs config 16; "
        "new: saved <absent> vs config 1; ttt.layers: saved '1,5' vs config '2'"
    )


def test_trained_params_read_from_step_dir_and_params_dir(tmp_path):
    """A step dir's trained params restore exactly (restore_trainables, checkpoint.init_state_dir); the
    slice-by-slice reader that conversion and open_weights use reads them and a model dir's params."""
    m = run_saves(tmp_path / "run", [1], max_to_keep=None, save_interval_steps=1)
    m.close()
    params = make_state(1)["params"]
    assert_tree_equal(restore_trainables(step_dir(tmp_path / "run", 1), abstract(params)), params)
    from_step = OrbaxSource(step_dir(tmp_path / "run", 1) / "state", prefix=("params",))
    assert sorted(from_step.specs) == [("b",), ("w",)]
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "imported" / "params", params)
    from_dir = OrbaxSource(tmp_path / "imported" / "params")
    for source in (from_step, from_dir):
        for key in ("w", "b"):
            np.testing.assert_array_equal(source.read((key,)), np.asarray(params[key]))
            assert source.specs[(key,)][1] == params[key].dtype


def test_preemption_poll_only_sees_increasing_steps(tmp_path, monkeypatch):
    """Orbax's finalize thread re-asks with the saved (older) step; JAX must never see it, or the
    agreed sync point can land in the past (tttjax.checkpoint.manager._OrbaxManager)."""
    asked = []
    jax_poll = lambda self, s: asked.append(s) or s == 9  # noqa: E731  # preempted at step 9
    monkeypatch.setattr(ocp.CheckpointManager, "reached_preemption", jax_poll)
    m = CheckpointManager(tmp_path, max_to_keep=None, save_interval_steps=2)
    for step in range(1, 20):
        preempted = m.reached_preemption(step)
        if preempted or m.should_save(step):
            m.save(step, make_state(step), {"next_index": step}, force=preempted)
        if preempted:
            break
    m.close()
    assert step == 9 and m.all_steps() == [2, 4, 6, 8, 9]
    assert asked == list(range(1, 10))
