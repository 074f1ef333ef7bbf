"""Meshes, sharding rules, sharded training equivalence (8 fake CPU devices), memory estimate, launchers.

The 8-device checks run in subprocesses (XLA_FLAGS must be set before JAX starts its backend),
so the rest of the suite stays single-device; run as a script (`python tests/test_sharding.py
OUT.npz 8x1x1,2x2x2`), this file is such a subprocess.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tttjax.analysis import fit, memory
from tttjax.parallel import distributed
from tttjax.parallel import mesh as mesh_lib
from tttjax.parallel import sharding as sh

REPO = Path(__file__).resolve().parents[1]
MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]
# Frozen-weight placements other than "sharded", each on one mesh (its name: "1x4x2:replicated").
PLACEMENTS = [((1, 4, 2), "replicated"), ((2, 2, 2), "gather_once")]
# The subprocess runs compile with LLVM optimisation off: XLA's own passes (SPMD partitioning, fusion)
# run as usual, the generated CPU code is just less optimised and compiles ~2x faster.
FAST_COMPILE = "--xla_backend_optimization_level=0"
MAX_STEPS = 16  # the OneCycle schedule's length; shared with test_multiprocess.py (same compiled step)
NUM_STEPS = 3


# ----------------------------------------------------------------------------------------------
# Mesh resolution and logical rules (no devices needed)


def test_resolve_mesh():
    assert mesh_lib.resolve_mesh({"data": -1, "fsdp": 1, "tensor": 1}, 8) == ((8, 1, 1), (1, 1, 1))
    assert mesh_lib.resolve_mesh({"data": 1, "fsdp": -1, "tensor": 2}, 8) == ((1, 4, 2), (1, 1, 1))
    # multi-slice: per-slice ICI sizes x DCN sizes over 4 slices of 16 devices
    assert mesh_lib.resolve_mesh({"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": -1}, 64, 4) == ((1, 16, 1), (4, 1, 1))
    assert mesh_lib.resolve_mesh({"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 2, "dcn_fsdp": -1}, 64, 4) == \
        ((1, 16, 1), (2, 2, 1))
    for bad, match in [({"data": -1, "fsdp": -1}, "at most one"), ({"data": 3}, "does not fit"),
                       ({"data": 2, "fsdp": 2, "tensor": 1}, "uses 4 of 8"), ({"data": 0}, ">= 1")]:
        with pytest.raises(ValueError, match=match):
            mesh_lib.resolve_mesh(bad, 8)
    with pytest.raises(ValueError, match="dcn"):
        mesh_lib.resolve_mesh({"data": -1, "dcn_data": 3}, 8, 2)


def test_fit_spec_drops_what_does_not_divide_and_repeated_axes():
    sizes = {"data": 2, "fsdp": 4, "tensor": 2}
    assert sh.fit_spec(P("tensor", "fsdp"), (2049, 4096), sizes) == P(None, "fsdp")  # odd vocab
    assert sh.fit_spec(P("fsdp", "fsdp"), (4096, 128), sizes) == P("fsdp")  # LoRA A: embed and rank
    assert sh.fit_spec(P("tensor", "fsdp"), (128, 4096), sizes) == P("tensor", "fsdp")  # LoRA A after heads
    assert sh.fit_spec(P(("data", "fsdp")), (12,), sizes) == P()  # 12 % 8


class _Unannotated(nnx.Module):
    def __init__(self):
        self.good = nnx.Param(jnp.zeros((4, 8)), out_sharding=("embed", "mlp"))
        self.bad = nnx.Param(jnp.zeros((4, 8)))


def test_state_shardings_rejects_a_parameter_without_sharding_names():
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    with nnx.use_eager_sharding(False):  # as the model is built (tttjax.model.moshi.create_model)
        model = _Unannotated()
        with pytest.raises(ValueError, match=r"parameter bad \(4, 8\) has no sharding annotation"):
            sh.state_shardings(nnx.state(model), mesh)
        model.bad = nnx.Param(jnp.zeros((4, 8)), out_sharding=("embed", "no_such_axis"))
        with pytest.raises(KeyError, match="no_such_axis"):
            sh.state_shardings(nnx.state(model), mesh)
        model.bad = nnx.Param(jnp.zeros((4, 8)), out_sharding=("embed",))
        with pytest.raises(ValueError, match="do not match shape"):
            sh.state_shardings(nnx.state(model), mesh)
        model.bad = nnx.Param(jnp.zeros((4, 8)), out_sharding=("embed", None))
        assert sh.state_shardings(nnx.state(model), mesh)["bad"].spec == P("fsdp")


def test_7b_parameters_are_all_sharded_on_a_v5p_64_mesh():
    """Every 7B weight is split over fsdp=32 except small ones (norms, TTT inner weights, gates)."""
    from tttjax.model.config import from_run_config as model_config
    from tttjax.model.moshi import abstract_model

    cfg = model_config(importlib.import_module("configs.moshi_7b_ttt").get_config())
    sizes = {"data": 1, "fsdp": 32, "tensor": 1}
    total = local = 0
    replicated = []
    for path, variable in nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param)):
        spec = sh.param_specs(nnx.State({"x": variable}), sizes)["x"]
        n = int(np.prod(variable.shape))
        total += n
        local += n // memory._shards(spec, sizes)
        if spec == P() or all(a is None for a in spec):
            replicated.append((".".join(map(str, path)), n))
    assert max(n for _, n in replicated) <= 2 * 1024 * 1024, sorted(replicated, key=lambda x: -x[1])[:5]
    # what is not split: norms, gates, TTT inner weights W1/W2 (3 layers x 2 x 2.1M, sharded by ttt_heads
    # over `tensor` only): ~13M of 8.3G
    assert sum(n for _, n in replicated) < 15e6
    assert local < total / 32 + 15e6, (local, total / 32)


def test_opt_state_shardings_follow_params():
    from tttjax.train.optimizer import make_optimizer

    config = importlib.import_module("configs.tiny").get_config()
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    def put(shape, spec):
        return jax.device_put(jnp.ones(shape), jax.sharding.NamedSharding(mesh, spec))

    params = {"transformer": {"k": put((4, 8), P("fsdp", "tensor"))}, "ttt": {"gating_alpha": put((8,), P("fsdp"))}}
    labels = {"transformer": {"k": "base"}, "ttt": {"gating_alpha": "gate"}}
    opt = make_optimizer(config.optim, 10, labels)
    shardings = sh.opt_state_shardings(jax.eval_shape(opt.init, params), params, mesh)
    flat = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    mu = [k for k in flat if ".mu" in k or ".nu" in k]
    assert len(mu) == 4
    for k in mu:
        assert flat[k] == (P("fsdp", "tensor") if "['k']" in k else P("fsdp")), k
    assert all(flat[k] == P() for k in flat if k not in mu)


# ----------------------------------------------------------------------------------------------
# Memory estimate


def _estimate(remat, attention="auto", platform="gpu", **mesh):
    from tttjax.data import num_frames
    from tttjax.model.config import from_run_config as model_config

    config = importlib.import_module("configs.moshi_7b_ttt").get_config()
    config.remat = remat
    config.model.attention_impl = attention
    return memory.estimate_memory(model_config(config), batch_size=config.batch_size, num_microbatches=1,
                                  num_frames=num_frames(config.duration_sec), full_finetuning=False, mesh_axes=mesh,
                                  platform=platform)


def test_memory_estimate_7b():
    v5p_64 = _estimate("full", platform="tpu", data=1, fsdp=16, tensor=2)  # 32 chips, 95 GiB each (batch 16: 16-way batch split)
    h100 = _estimate("full", data=1, fsdp=8, tensor=1)  # 8 x H100 80 GB
    assert v5p_64.total < h100.total < 25 * memory.GiB
    assert v5p_64.frozen_params == pytest.approx(7.69e9 * 2 / 32, rel=0.05)
    dots = _estimate("dots", data=1, fsdp=8, tensor=1)
    assert dots.total > h100.total
    # save_qkv keeps full's layer inputs and the q/k/v projections (bf16): 3 x dim per token and layer,
    # per step in the depformer, three more in each TTT layer (2 sequences of 1250 frames per device);
    # the 7B compile for v5e-16 measured 0.93x this estimate's total (BENCHMARKS.md)
    qkv = _estimate("save_qkv", data=1, fsdp=8, tensor=1)
    from tttjax.model.config import from_run_config

    cfg = from_run_config(importlib.import_module("configs.moshi_7b_ttt").get_config())
    assert (cfg.num_layers, cfg.dim, len(cfg.ttt_layers)) == (32, 4096, 3)
    per_token = 32 * 3 * 4096 + cfg.depformer_num_layers * cfg.dep_q * 3 * cfg.depformer_dim + 3 * 3 * 4096
    assert qkv.saved_activations - h100.saved_activations == 2 * 1250 * 2 * per_token
    assert h100.total < qkv.total < dots.total
    # without remat and with full T x T scores kept for every layer, data parallelism does not fit an
    # H100 (the check says so); cuDNN's fused attention keeps no scores
    data_parallel = _estimate("none", attention="xla", data=8, fsdp=1, tensor=1)
    assert data_parallel.total > 80e9
    fused = _estimate("none", data=8, fsdp=1, tensor=1)  # auto on GPU in bf16: cudnn
    # 2 sequences per device x 32 layers x 32 heads x T^2 x (fp32 scores + bf16 probs) = 19.2 GB
    assert data_parallel.total - fused.total > 2 * 32 * 32 * 1250 ** 2 * 6
    est = dict(source="analytic estimate", advice=fit.train_advice("none", {"data": 8}))
    with pytest.raises(fit.OutOfMemory, match="analytic estimate.*does not fit.*mesh.fsdp"):
        fit.check(data_parallel.total, 80 * 10**9, mode="error", what="8xH100 data-parallel", **est)
    assert "does not fit" in fit.check(data_parallel.total, 80 * 10**9, mode="warn", what="x", **est)
    assert fit.check(h100.total, 80 * 10**9, mode="error", what="8xH100 fsdp", **est) is None
    assert "within 10%" in fit.check(int(0.95 * 80 * 10**9), 80 * 10**9, mode="error", what="x", **est)  # tight
    assert fit.check(data_parallel.total, 80 * 10**9, mode="off", what="x", **est) is None


def test_compile_oom_figures():
    """XLA:TPU's compile-time refusals (a JaxRuntimeError with status RESOURCE_EXHAUSTED), in both
    forms it prints, give (needed, available) bytes; other errors are not out-of-memory."""
    temps = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
                                       "HLO temporaries (48.79G) exceeds available HBM (15.75G).")
    assert fit.refusal(temps) == fit.Refusal(int(48.79 * memory.GiB), int(15.75 * memory.GiB))
    used = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in "
                                      "memory space hbm. Used 20.50G of 15.48G hbm. Exceeded hbm capacity by 5.02G.")
    assert fit.refusal(used) == fit.Refusal(int(20.5 * memory.GiB), int(15.48 * memory.GiB))
    assert fit.refusal(jax.errors.JaxRuntimeError("INTERNAL: something else")) is None
    assert fit.refusal(RuntimeError("RESOURCE_EXHAUSTED: not the runtime's")) is None  # the class decides

    def failing(error):
        def build():
            raise error
        return build

    assert fit.compile_program(failing(temps)) == (None, fit.refusal(temps))
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        fit.compile_program(failing(jax.errors.JaxRuntimeError("INTERNAL: x")))


# ----------------------------------------------------------------------------------------------
# Sharded training == single device (8 fake CPU devices in a subprocess)


def _config(run_dir, mesh, frozen_weights="sharded"):
    from test_train import micro_config

    return micro_config(run_dir, batch_size=8, max_steps=MAX_STEPS, do_ckpt=False, export_dtype="float32",
                        frozen_weights=frozen_weights,
                        **{"mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]})


def _train(run_dir, mesh, frozen_weights="sharded"):
    """NUM_STEPS steps of the real Trainer (its data path and jitted step); (losses, params, trainer)."""
    from tttjax.train.loop import Trainer

    trainer = Trainer(_config(run_dir, mesh, frozen_weights))
    trainer.born_specs = _specs(trainer.state)
    batches = trainer._batches(0)
    state, losses = trainer.state, []
    for _ in range(NUM_STEPS):
        codes = next(batches)
        trainer.batch_spec = tuple(codes.sharding.spec)
        state, metrics = trainer.program.step(state, trainer.frozen, codes)
        losses.append(float(metrics["loss"]))
    trainer.state = state
    return losses, state, trainer


def _specs(tree):
    return {jax.tree_util.keystr(p): tuple(x.sharding.spec) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _child(out: str, meshes: str) -> None:
    """One side of the comparison: train on each mesh, check shardings, save losses and params."""
    import tempfile

    runs = [(m, tuple(int(n) for n in m.split(":")[0].split("x")), (m.split(":") + ["sharded"])[1])
            for m in meshes.split(",")]
    distributed.initialize_distributed()  # before anything starts JAX's backend, as tttjax.main does
    assert jax.device_count() == int(np.prod(runs[0][1])), jax.devices()
    results, report = {}, {}
    for name, mesh, frozen_weights in runs:
        with tempfile.TemporaryDirectory() as tmp:
            losses, state, trainer = _train(tmp, mesh, frozen_weights)
        specs = _specs(state)
        params = dict(_specs(state.params))
        # Adam moments: "...inner_state[0].mu['depformer'][...]" -> the parameter "['depformer'][...]"
        mu = {k: v for k, v in specs.items() if ".mu[" in k or ".nu[" in k}
        slot_param = {k: k[max(k.rfind(".mu["), k.rfind(".nu[")) + 3:] for k in mu}
        report[name] = {
            "losses": losses,
            "kept": specs == trainer.born_specs,  # the step returns the state in the shardings it was born with
            "mesh": dict(trainer.mesh.shape),
            "sharded_params": sum(any(a is not None for a in v) for v in params.values()),
            "num_params": len(params),
            "mu_like_params": len(mu) == 2 * len(params) and all(mu[k] == params[slot_param[k]] for k in mu),
            "scalars_replicated": all(v == () for k, v in specs.items() if k not in mu
                                      and not k.startswith(".params")),
            "batch_spec": trainer.batch_spec,
            "frozen_sharded": sum(any(a is not None for a in v) for v in _specs(trainer.frozen).values()),
            "frozen_over_fsdp": sum("fsdp" in str(v) for v in _specs(trainer.frozen).values()),
        }
        for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]:
            results[f"{name}/{jax.tree_util.keystr(path)}"] = np.asarray(x)
    np.savez(out, **results)
    Path(out).with_suffix(".json").write_text(json.dumps(report))


def test_sharded_train_step_matches_one_device(tmp_path):
    """Meshes (8,1,1), (2,2,2), (1,4,2) on 8 devices vs 1 device: same losses and params; so are the
    frozen base replicated over fsdp on (1,4,2) and gathered once per step on (2,2,2).

    Tolerance: fp32 throughout; the meshes only change how reductions are split and ordered
    (all-reduces of partial sums, per-shard GEMMs), so losses agree to ~1e-6 relative and params,
    after 3 AdamW steps, to atol 2e-6 (Adam's m/sqrt(v) normalises tiny gradients, which can turn a
    1e-7 gradient difference into a ~1e-7 relative update difference; lr <= 3e-3).
    """
    def start(devices, meshes, out):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}")
        return subprocess.Popen([sys.executable, str(Path(__file__)), str(out), meshes], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    out, ref_out = tmp_path / "sharded.npz", tmp_path / "ref.npz"
    names = ["x".join(map(str, m)) for m in MESHES] + [f"{'x'.join(map(str, m))}:{p}" for m, p in PLACEMENTS]
    children = [start(8, ",".join(names), out), start(1, "1x1x1", ref_out)]
    for child in children:
        log = child.communicate(timeout=900)[0].decode()
        assert child.returncode == 0, log[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    sharded = np.load(out)
    ref_losses = json.loads(ref_out.with_suffix(".json").read_text())["1x1x1"]["losses"]
    ref = {k.split("/", 1)[1]: v for k, v in np.load(ref_out).items()}
    for name in names:
        mesh, placement = tuple(int(n) for n in name.split(":")[0].split("x")), (name.split(":") + ["sharded"])[1]
        r = report[name]
        assert r["mesh"] == dict(zip(mesh_lib.MESH_AXES, mesh))
        assert r["kept"] and r["mu_like_params"] and r["scalars_replicated"], r
        assert r["sharded_params"] > r["num_params"] // 2 and r["frozen_sharded"] > 10, r
        assert (r["frozen_over_fsdp"] == 0) == (placement == "replicated"), r
        assert r["batch_spec"][0] == ["data", "fsdp"] and not any(r["batch_spec"][1:]), r
        np.testing.assert_allclose(r["losses"], ref_losses, rtol=2e-6, err_msg=name)
        for key, want in ref.items():
            np.testing.assert_allclose(sharded[f"{name}/{key}"], want, rtol=0, atol=2e-6, err_msg=f"{name} {key}")


# ----------------------------------------------------------------------------------------------
# Launchers: --dry_run output


def _dry_run(module, argv, capsys):
    if str(REPO) not in sys.path:  # launch/ is run from the repo root (python -m launch.x), not installed
        sys.path.insert(0, str(REPO))
    assert importlib.import_module(module).main(["--dry_run"] + argv) == 0
    return capsys.readouterr().out


TRAIN = ["--", "--config=configs/moshi_7b_ttt.py", "--config.run_dir=/shared/runs/7b"]


def test_local_launcher_dry_run(capsys):
    out = _dry_run("launch.local", ["--num_processes=2", "--devices_per_process=4", "--port=2222"] + TRAIN, capsys)
    lines = out.strip().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("wait")
    for i in range(2):
        assert (f"JAX_COORDINATOR_ADDRESS=localhost:2222 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID={i} "
                f"XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu ") in lines[i]
        assert lines[i].endswith("-m tttjax.main --config=configs/moshi_7b_ttt.py --config.run_dir=/shared/runs/7b &")


_CHILD = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0 if os.environ["JAX_PROCESS_ID"] == "0" else 7))
print("ready", os.environ["JAX_PROCESS_ID"], flush=True)
if sys.argv[1] == "fail" and os.environ["JAX_PROCESS_ID"] == "1":
    sys.exit(3)
time.sleep(60)
"""


def test_local_launcher_forwards_sigterm_and_reports_failures(tmp_path):
    """SIGTERM to the launcher reaches every process; a failing process stops the others; exit codes."""
    import signal
    import time

    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    runner = ("import sys; from launch.local import run, process_env; "
              "sys.exit(run([sys.executable, sys.argv[1], sys.argv[2]], [process_env({}, index=i, num=2, port=1, "
              "devices_per_process=0, platform='', one_gpu_per_process=False) for i in range(2)], "
              "log_dir=sys.argv[3], grace_s=1))")

    def launch(mode):
        return subprocess.Popen([sys.executable, "-c", runner, str(script), mode, str(tmp_path / mode)], cwd=REPO,
                                stdout=subprocess.PIPE, text=True)

    forwarded = launch("wait")
    deadline = time.time() + 30
    while time.time() < deadline and not all(
            (tmp_path / "wait" / f"process_{i}.log").exists() and "ready" in (tmp_path / "wait" / f"process_{i}.log")
            .read_text() for i in range(2)):
        time.sleep(0.1)
    forwarded.send_signal(signal.SIGTERM)
    out = forwarded.communicate(timeout=30)[0]
    assert forwarded.returncode == 7 and "exit codes [0, 7]" in out, out  # both got it; the failure is reported
    failed = launch("fail")
    out = failed.communicate(timeout=30)[0]
    # process 0 was sent SIGTERM after the 1 s grace (its handler exits 0); the failure's code is returned
    assert failed.returncode == 3 and "process 1 exited with 3" in out and "exit codes [0, 3]" in out, out


def test_slurm_launcher_dry_run(capsys, tmp_path):
    out = _dry_run("launch.slurm", ["--nodes=2", "--gpus_per_node=8", "--per=gpu", "--partition=a3", "--time=24:00:00",
                                    f"--script={tmp_path / 'job.sbatch'}", "--max_restarts=3"] + TRAIN, capsys)
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=a3", "#SBATCH --time=24:00:00", "#SBATCH --requeue", "#SBATCH --signal=TERM@",
                 'export JAX_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):',
                 "export JAX_NUM_PROCESSES=$SLURM_NTASKS", "JAX_PROCESS_ID=$SLURM_PROCID",
                 "JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID", "srun --kill-on-bad-exit=1",
                 "-m tttjax.main --config=configs/moshi_7b_ttt.py --config.run_dir=/shared/runs/7b",
                 f"sbatch {tmp_path / 'job.sbatch'}"]:
        assert line in out, line
    assert not (tmp_path / "job.sbatch").exists()  # a dry run writes nothing
    per_host = _dry_run("launch.slurm", ["--nodes=4", "--gpus_per_node=8", "--per=host"] + TRAIN, capsys)
    assert "#SBATCH --ntasks-per-node=1" in per_host and "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in per_host


def test_tpu_pod_launcher_dry_run(capsys):
    out = _dry_run("launch.tpu_pod", ["--name=ttt", "--zone=us-east5-a", "--project=p", "--accelerator_type=v5p-64",
                                      "--spot", "--max_restarts=5"] + TRAIN, capsys)
    for part in ["gcloud compute tpus tpu-vm describe ttt --zone=us-east5-a --project=p",
                 "gcloud compute tpus tpu-vm create ttt --zone=us-east5-a --project=p --accelerator-type=v5p-64 "
                 "--version=v2-alpha-tpuv5 --spot",
                 "gcloud compute tpus tpu-vm scp", "--worker=all",
                 "gcloud compute tpus tpu-vm ssh ttt --zone=us-east5-a --project=p --worker=all '--command=",
                 "pip install", "jax[tpu]",
                 "python -m tttjax.main --config=configs/moshi_7b_ttt.py --config.run_dir=/shared/runs/7b",
                 "up to 5 restarts", "gcloud compute tpus tpu-vm delete ttt"]:
        assert part in out, part
    multi = _dry_run("launch.tpu_pod", ["--name=ttt", "--zone=z", "--accelerator_type=v5p-64", "--num_slices=2"]
                     + TRAIN, capsys)
    for part in ["queued-resources create ttt", "--node-count=2", "MEGASCALE_NUM_SLICES=2", "MEGASCALE_SLICE_ID=1",
                 "MEGASCALE_COORDINATOR_ADDRESS=", "ttt-1"]:
        assert part in multi, part


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
