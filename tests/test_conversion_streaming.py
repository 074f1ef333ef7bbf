"""Streaming conversion: the safetensors reader/writer against the reference `safetensors` package,
layer-chunked Orbax storage, export from a step dir without its base, and a 2-process import onto
the mesh plus export in which each tensor is gathered once and only process 0 writes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import torch_reference as ref
from safetensors.torch import load_file as torch_load
from safetensors.torch import save_file as torch_save

from conversion.to_pytorch import main as to_pytorch_main
from tttjax.weights import safetensors_io as st

REPO = Path(__file__).resolve().parents[1]


def sample_tensors():
    rng = np.random.default_rng(0)
    return {
        "b.bf16": rng.normal(size=(5, 3, 4)).astype(ml_dtypes.bfloat16),
        "a.f32": rng.normal(size=(7, 6)).astype(np.float32),
        "c.f16": rng.normal(size=(3,)).astype(np.float16),
        "d.i64": np.arange(-4, 8, dtype=np.int64).reshape(3, 4),
        "e.bool": rng.random((2, 5)) > 0.5,
        "f.scalar": np.asarray(2.5, np.float32),
        "g.empty": np.zeros((0, 3), np.float32),
    }


def as_torch(v: np.ndarray) -> torch.Tensor:
    if v.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(v.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(v))


def test_writer_output_loads_in_the_reference_reader(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "x.safetensors"
    with st.SafetensorsWriter(path, {k: (v.shape, v.dtype) for k, v in tensors.items()},
                              metadata={"format": "pt"}) as w:
        for name in sorted(tensors):
            w.write(name, tensors[name])
    theirs = torch_load(str(path))
    assert theirs.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(theirs[k], as_torch(v)), k
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert not list(tmp_path.glob("*.partial"))


def test_reader_reads_reference_files(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "ref.safetensors"
    torch_save({k: as_torch(v) for k, v in tensors.items()}, str(path))
    with st.SafetensorsReader(path) as r:
        assert sorted(r.names()) == sorted(tensors)
        for k, v in tensors.items():
            got = r.read(k)
            assert got.dtype == v.dtype and got.shape == v.shape, k
            np.testing.assert_array_equal(got, v, err_msg=k)


def test_writer_refuses_bad_tensors_and_leaves_no_partial_file(tmp_path):
    a, b = np.zeros((4, 2), np.float32), np.ones(3, ml_dtypes.bfloat16)
    path = tmp_path / "w.safetensors"
    specs = {"a": (a.shape, a.dtype), "b": (b.shape, b.dtype)}
    with pytest.raises(ValueError, match="expected tensor 'a' next, got 'b'"):
        with st.SafetensorsWriter(path, specs) as w:
            w.write("b", b)
    with pytest.raises(ValueError, match=r"a is float64\[4, 2\], its header says float32\[4, 2\]"):
        with st.SafetensorsWriter(path, specs) as w:
            w.write("a", a.astype(np.float64))
    with pytest.raises(ValueError, match=r"a is float32\[3, 2\], its header says float32\[4, 2\]"):
        with st.SafetensorsWriter(path, specs) as w:
            w.write("a", a[:3])
    with pytest.raises(ValueError, match="tensor 'b' and 0 more were never given"):
        with st.SafetensorsWriter(path, specs) as w:
            w.write("a", a)
    assert not list(tmp_path.iterdir())  # neither the file nor a .partial left behind


def test_reader_names_the_broken_part(tmp_path):
    good = tmp_path / "g.safetensors"
    st.save(good, {"w": np.arange(12, dtype=np.float32).reshape(3, 4)})
    data = good.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])

    def variant(name, head, body=None):  # the same file with its header or data replaced
        blob = json.dumps(head).encode()
        path = tmp_path / name
        path.write_bytes(len(blob).to_bytes(8, "little") + blob + (data[8 + n:] if body is None else body))
        return path

    bad = tmp_path / "c.safetensors"
    bad.write_bytes((5).to_bytes(8, "little") + b"{nope" + data[8 + n:])
    with pytest.raises(st.SafetensorsError, match="c.safetensors: corrupt header"):
        st.SafetensorsReader(bad)
    with pytest.raises(st.SafetensorsError, match="tensor 'w' has an unsupported or corrupt header entry"):
        st.SafetensorsReader(variant("d.safetensors", {"w": dict(header["w"], dtype="C64")}))
    with pytest.raises(st.SafetensorsError, match=r"tensor 'w' has offsets \[0, 40\] that do not match its shape"):
        st.SafetensorsReader(variant("o.safetensors", {"w": dict(header["w"], data_offsets=[0, 40])}))
    with pytest.raises(st.SafetensorsError, match="t.safetensors: truncated: tensor 'w' ends at byte"):
        st.SafetensorsReader(variant("t.safetensors", header, data[8 + n:-4]))
    with pytest.raises(st.SafetensorsError, match="too short"):
        (tmp_path / "s.safetensors").write_bytes(b"abc")
        st.SafetensorsReader(tmp_path / "s.safetensors")


def test_tiled_transpose_equals_numpy():
    """Both directions of every kernel go through it: any tile edge case would corrupt weights."""
    from tttjax.weights.layout import transpose

    rng = np.random.default_rng(1)
    for dtype in (ml_dtypes.bfloat16, np.float32, np.float16, np.float64):
        for shape in [(300, 517), (256, 256), (257, 1), (1, 5), (1000, 300), (7, 3000)]:
            x = rng.standard_normal(shape).astype(dtype)
            y = transpose(x)
            assert y.dtype == x.dtype and y.flags.c_contiguous
            np.testing.assert_array_equal(y.view(np.uint8), np.ascontiguousarray(x.T).view(np.uint8))


# ----------------------------------------------------------------------------------------------
# Checkpoints: one chunk per layer; a step dir exports without building the model


def test_saved_params_are_chunked_per_layer_and_read_by_slice(tmp_path):
    from tttjax.checkpoint.model_dir import save_model
    from tttjax.model.config import from_lm_kwargs
    from tttjax.model.moshi import create_model
    from tttjax.weights.sources import ModelSource, OrbaxSource

    model = create_model(from_lm_kwargs(ref.lm_kwargs(num_layers=3)))
    save_model(tmp_path / "m", model)
    stored, live = OrbaxSource(tmp_path / "m" / "params"), ModelSource(model)
    assert stored.specs == live.specs
    path = ("transformer", "gating", "linear_in", "kernel")
    assert stored.specs[path][0][0] == 3
    # Each layer's matrix is its own chunk: a slice read touches one layer's bytes only.
    assert stored._array(path).chunk_layout.read_chunk.shape[0] == 1
    for index in [(0,), (2,)]:
        np.testing.assert_array_equal(stored.read(path, index), live.read(path, index))
    dep = ("depformer", "gating", "linear_in", "kernel")  # [layers, steps, in, out]: chunk per (layer, step)
    assert tuple(stored._array(dep).chunk_layout.read_chunk.shape[:2]) == (1, 1)
    np.testing.assert_array_equal(stored.read(dep, (1, 3)), live.read(dep, (1, 3)))


@pytest.fixture(scope="module")
def trained_on_pytorch_base(tmp_path_factory):
    """2 steps of a LoRA + TTT run whose base weights are a PyTorch file (moshi_paths)."""
    from test_train import micro_config

    from tttjax.train.loop import Trainer

    root = tmp_path_factory.mktemp("step_export")
    kwargs = ref.lm_kwargs(num_layers=3, dim=32, num_heads=2, card=16, text_card=24, depformer_dim=16,
                           depformer_num_layers=1, depformer_num_heads=2, depformer_dim_feedforward=64)
    weights = ref.save_safetensors(root / "base.safetensors", ref.state_dict_numpy(ref.build_lm(kwargs, seed=3)),
                                   dtype=torch.bfloat16)
    config_json = ref.save_config(root / "config.json", kwargs)
    config = micro_config(root / "run", max_steps=2, ckpt_freq=0, **{
        "moshi_paths.moshi_path": str(weights), "moshi_paths.config_path": str(config_json)})
    Trainer(config).run()
    return root, root / "run" / "checkpoints" / "checkpoint_000002"


def test_step_dir_exports_without_building_the_model(trained_on_pytorch_base, tmp_path, monkeypatch):
    """Full export = the loaded model's export, bitwise; adapters-only never touches the base file."""
    from tttjax.weights import loader as weights_lib
    from tttjax.weights.export import plan_export
    from tttjax.weights.sources import ModelSource

    root, step = trained_on_pytorch_base
    model = weights_lib.load_model(step)
    # From here on the CLI must not build the model (it reads the step's state and the base file).
    for builder in ("materialize", "init_model"):
        monkeypatch.setattr(weights_lib, builder, lambda *a, **k: pytest.fail("the CLI built the model"))
    assert to_pytorch_main(["--checkpoint_dir", str(step), "--out", str(tmp_path / "full"),
                            "--dtype", "float32"]) == 0
    plan_export(model.cfg, ModelSource(model), dtype="float32").write(tmp_path / "loaded")
    streamed = st.load(tmp_path / "full" / "consolidated.safetensors")
    loaded = st.load(tmp_path / "loaded" / "consolidated.safetensors")
    assert streamed.keys() == loaded.keys() and len(streamed) > 50
    for k in loaded:
        np.testing.assert_array_equal(streamed[k], loaded[k], err_msg=k)
    assert (tmp_path / "full" / "config.json").read_text() == (tmp_path / "loaded" / "config.json").read_text()
    base = root / "base.safetensors"
    os.rename(base, root / "moved.safetensors")  # adapters come from the step's state alone
    try:
        assert to_pytorch_main(["--checkpoint_dir", str(step), "--out", str(tmp_path / "adapters"),
                                "--adapters_only", "--dtype", "float32"]) == 0
    finally:
        os.rename(root / "moved.safetensors", base)
    adapters = st.load(tmp_path / "adapters" / "lora.safetensors")
    assert adapters and all(".lora_" in k or "seq_modeling_block" in k for k in adapters)
    assert any("seq_modeling_block" in k for k in adapters)
    plan_export(model.cfg, ModelSource(model), dtype="float32", adapters_only=True).write(tmp_path / "la")
    for k, v in st.load(tmp_path / "la" / "lora.safetensors").items():
        np.testing.assert_array_equal(adapters[k], v, err_msg=k)


# ----------------------------------------------------------------------------------------------
# Two processes x 4 CPU devices: import onto the mesh, export gathered once, written by process 0


def _child(weights: str, config: str, out: str) -> None:
    """One process: import fsdp-sharded, check its shards, export (process 0 writes)."""
    from tttjax.parallel import distributed
    from tttjax.parallel import mesh as mesh_lib

    distributed.initialize_distributed()
    import jax
    from flax import nnx

    from tttjax.model.params import init_model
    from tttjax.weights.export import plan_export
    from tttjax.weights.pytorch import open_pytorch
    from tttjax.weights.sources import ModelSource, copy_into

    assert jax.process_count() == 2 and jax.device_count() == 8
    source = open_pytorch(weights, config)
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    model = init_model(source.cfg, mesh, seed=0)
    before = {p: v.get_value().sharding for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    copy_into(model, source, source_name=weights)
    sharded, checked = 0, 0
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path, value = tuple(str(k) for k in p), v.get_value()
        assert value.sharding == before[p], path
        assert not value.is_fully_addressable
        sharded += any(a is not None for a in value.sharding.spec)
        full = np.concatenate([source.read(path, i)[None] for i in source.indices(path)]) \
            if source.indices(path) != [()] else source.read(path)
        full = full.reshape(value.shape)
        for shard in value.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index], err_msg=str(path))
            checked += 1
    plan_export(source.cfg, ModelSource(model), dtype="float32").write(
        Path(out) / f"p{jax.process_index()}", writer=jax.process_index() == 0)
    (Path(out) / f"report{jax.process_index()}.json").write_text(json.dumps({"sharded": sharded, "checked": checked, "params": len(before)}))


def test_two_processes_import_onto_the_mesh_and_export_once(tmp_path):
    kwargs = ref.lm_kwargs()
    sd = ref.state_dict_numpy(ref.build_lm(kwargs, seed=5))
    weights = ref.save_safetensors(tmp_path / "w.safetensors", sd)
    config = ref.save_config(tmp_path / "config.json", kwargs)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}",
               XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_NUM_PROCESSES="2",
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}")
    children = [subprocess.Popen([sys.executable, str(Path(__file__)), str(weights), str(config), str(tmp_path)],
                                 cwd=REPO, env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT) for i in range(2)]
    for child in children:
        log = child.communicate(timeout=600)[0].decode()
        assert child.returncode == 0, log[-3000:]
    reports = [json.loads((tmp_path / f"report{i}.json").read_text()) for i in range(2)]
    # Every param checked on each of the process's 4 devices; most are split across the mesh.
    assert all(r["checked"] == 4 * r["params"] and r["sharded"] > r["params"] // 2 for r in reports), reports
    assert not (tmp_path / "p1").exists()  # only process 0 writes
    exported = st.load(tmp_path / "p0" / "consolidated.safetensors")
    assert exported.keys() == sd.keys()
    for k, v in sd.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


if __name__ == "__main__":
    _child(*sys.argv[1:])
