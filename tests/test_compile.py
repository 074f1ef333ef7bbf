"""`python -m tttjax.compile`: the trainer's step compiled for TPU topologies on this CPU host (libtpu).

Each TPU compile of these tiny steps takes ~30 s on 2 cores, so the tests compile as few as they can:
one single-slice report (train + eval), one 2-slice report, one refusal.
"""

import importlib.util
import json

import micro
import pytest
from jax.experimental import topologies

from tttjax import compile as compile_cli
from tttjax.analysis import topology
from tttjax.analysis.flops import train_step_flops
from tttjax.config import reader
from tttjax.train import executable
from tttjax.train.loop import Trainer
from tttjax.train.program import build_program

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (.ci/run installs it)")

# the micro model (tests/micro.py), FSDP over the devices of one slice
SMALL = micro.cli(mesh__data=1, mesh__fsdp=-1, batch_size=8, duration_sec=1.28)
REPORT_KEYS = {"topology", "num_devices", "mesh", "per_device", "hbm_bytes", "fits", "estimate_bytes",
               "model_flops_per_step", "compiler_flops_per_device", "collectives", "compile_s"}
PER_DEVICE_KEYS = {"argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "generated_code_bytes",
                   "total_bytes"}


def _run(args, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = compile_cli.main(args + [f"--output_json={out}"])
    captured = capsys.readouterr()
    return code, json.loads(out.read_text()) if out.exists() and out.stat().st_size else None, captured


@needs_libtpu
def test_compiles_for_v5e_and_reports_the_compilers_own_figures(tmp_path, capsys):
    code, report, captured = _run(SMALL + ["--topology=v5e:2x2"], tmp_path, capsys)
    assert code == 0, captured.err
    assert REPORT_KEYS <= set(report) and PER_DEVICE_KEYS <= set(report["per_device"])
    assert report["topology"] == "v5e-4" and report["num_devices"] == 4
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert report["hbm_bytes"] == 16 * topology.GiB and report["fits"] is True
    assert report["eval"]["fits"] and report["eval"]["per_device"]["total_bytes"] > 0
    # FSDP: weights all-gathered and gradients reduced over fsdp, nothing over DCN
    c = report["collectives"]
    assert c["all-gather"]["count"] > 0 and set(c["all-gather"]["by_axes"]) == {"fsdp"}
    assert c["all-reduce"]["count"] + c["reduce-scatter"]["count"] > 0
    assert sum(kind["dcn_count"] for kind in c.values()) == 0
    # the weight gathers are traced to both kinds of parameters: the frozen base and the trainables
    # (the fp32 masters of the TrainState, cast before their gathers; they read 0 when the tracer missed
    # their names; this model's compile moves 1.19x their minimum, half of it leaves XLA room)
    w = report["weight_gathers"]
    assert w["frozen"]["compiled_bytes"] > 0 and w["trainable"]["minimum_bytes"] > 0
    assert w["trainable"]["compiled_bytes"] >= w["trainable"]["minimum_bytes"] / 2

    # an independent AOT compile of the same step reports the same per-device figures
    config = reader.load("configs/tiny.py", reader.split_config_args(SMALL)[1])
    program = build_program(config, topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices)
    m = program.lower().compile().memory_analysis()
    figures = report["per_device"]
    assert (figures["argument_bytes"], figures["output_bytes"], figures["alias_bytes"], figures["temp_bytes"],
            figures["generated_code_bytes"]) == (m.argument_size_in_bytes, m.output_size_in_bytes,
                                                 m.alias_size_in_bytes, m.temp_size_in_bytes,
                                                 m.generated_code_size_in_bytes)
    assert figures["total_bytes"] == (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                                      - m.alias_size_in_bytes)
    assert report["model_flops_per_step"] == train_step_flops(program.cfg, 8, 16, full_finetuning=False)
    # the performance model: every part of the model found by its source, little left unattributed
    performance = report["performance"]
    assert {"temporal_attention", "temporal_mlp", "ttt_inner_scan", "ttt_branch", "depformer", "loss",
            "optimizer"} <= set(performance["parts"])
    assert performance["parts"].get("other", {"share": 0})["share"] < 0.1
    step = performance["step_s"]
    assert 0 < step["overlap"] <= step["roofline"] <= step["serial"]
    assert performance["flops_per_device"]["dot"] > 0 and performance["flops_per_device"]["kernels"] > 0  # splash
    assert "predicted" in captured.out
    assert "headroom" in captured.out and captured.out.rstrip().endswith("fits")
    assert "[compile]" in captured.err  # progress goes to stderr


@needs_libtpu
def test_two_slices_put_the_data_axis_over_dcn(tmp_path, capsys):
    code, report, captured = _run(SMALL + ["--topology=v5e-4", "--num_slices=2", "--config.mesh.dcn_data=2",
                                           "--no_eval", f"--save_executable={tmp_path / 'exe'}"], tmp_path, capsys)
    assert code == 0, captured.err
    assert report["topology"] == "2 x v5e-4" and report["num_devices"] == 8
    assert report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    gradients = report["collectives"]["all-reduce"]
    assert gradients["by_axes"]["data"]["count"] > 0 and gradients["dcn_count"] >= gradients["by_axes"]["data"]["count"]
    assert report["collectives"]["all-gather"]["dcn_count"] == 0  # FSDP gathers stay inside a slice (ICI)
    assert "DCN" in captured.out
    # the saved step says what it was compiled for; a job elsewhere (here: this CPU) is refused in one line
    manifest = json.loads((tmp_path / "exe" / "manifest.json").read_text())
    assert (manifest["platform"], manifest["device_kind"], manifest["num_devices"]) == ("tpu", "TPU v5 lite", 8)
    assert (tmp_path / "exe" / "train_step.bin").stat().st_size > 0
    config = reader.load("configs/tiny.py", reader.split_config_args(SMALL)[1])
    config.run_dir, config.compiled_step = str(tmp_path / "run"), str(tmp_path / "exe")
    with pytest.raises(executable.ExecutableMismatch, match="compiled for platform tpu, this run has cpu"):
        Trainer(config)


@needs_libtpu
def test_a_step_that_cannot_fit_exits_1_with_one_line(tmp_path, capsys):
    # configs/tiny.py on 2000 s sequences without remat and with full T x T scores: XLA:TPU refuses it
    # within a minute, needing tens of GiB of temporaries on a 16 GiB chip (splash, the TPU default,
    # fits it)
    code, report, captured = _run(["--config=configs/tiny.py", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
                                   "--config.batch_size=4", "--config.duration_sec=2000", "--topology=v5e-4",
                                   "--config.model.attention_impl=xla"],
                                  tmp_path, capsys)
    assert code == 1
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith("error: v5e-4: the train step does not fit:")
    assert "16.00 GiB" in errors[0] and "biggest in the estimate: saved activations" in errors[0]
    assert "remat=full" in errors[0] and "duration_sec" in errors[0]
    assert report["fits"] is False and report["headroom_bytes"] < 0


def test_unknown_topology_is_one_line(capsys):
    assert compile_cli.main(SMALL + ["--topology=v7x-8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'v7x-8'" in err and "v5p:2x2x1" in err and "v5e-16" in err


@needs_libtpu
def test_a_shape_the_generation_lacks_is_one_line(capsys):
    # libtpu refuses v5e:3x3 (its chips do not tile into 2x2 hosts); the line names the shape and the
    # slices v5e has, where it used to be a JaxRuntimeError traceback
    assert compile_cli.main(SMALL + ["--topology=v5e:3x3"]) == 2  # a topology the generation lacks: a usage error, as an unknown name
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("error: v5e-9: libtpu cannot build the topology v5e:3x3 (INVALID_ARGUMENT: ")
    assert errors[0].endswith("v5e slices: 1x1 (v5e-1), 2x2 (v5e-4), 2x4 (v5e-8), 4x4 (v5e-16), 4x8 (v5e-32), "
                              "8x8 (v5e-64), 8x16 (v5e-128), 16x16 (v5e-256)")


def test_missing_libtpu_is_one_line(capsys, monkeypatch):
    real = topology.importlib.util.find_spec
    monkeypatch.setattr(topology.importlib.util, "find_spec", lambda name: None if name == "libtpu" else real(name))
    assert compile_cli.main(SMALL + ["--topology=v5e-4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == 'error: v5e-4: compiling for TPU needs libtpu: pip install "jax[tpu]==<the installed jax version>"'


@pytest.mark.parametrize("name,slices,generation,shape,chips", [
    ("v5p-8", 1, "v5p", "2x2x1", 4), ("v5p-64", 1, "v5p", "2x4x4", 32), ("v5p:4x4x4", 1, "v5p", "4x4x4", 64),
    ("v5e-256", 2, "v5e", "16x16", 512), ("v6e-8", 1, "v6e", "2x4", 8), ("v5litepod-16", 1, "v5e", "4x4", 16)])
def test_topology_names(name, slices, generation, shape, chips):
    topo = topology.topology(name, slices)
    assert (topo.generation, topo.shape, topo.chips) == (generation, shape, chips)
    assert topology.topology(topo.name.split(" x ")[-1]).shape == shape  # the printed name reads back


def test_impossible_slice_sizes_are_named():
    with pytest.raises(ValueError, match="no v5p slice of that size.*v5p-8"):
        topology.topology("v5p-12")
    with pytest.raises(ValueError, match="unknown topology 'v5e:2x2x2'"):
        topology.topology("v5e:2x2x2")


@pytest.mark.parametrize("growth", [2.0, 1.1])
@pytest.mark.parametrize("limit", [1, 37, 1250, 1300, 99_999])
def test_longest_fit_search(limit, growth):
    """The search behind --find_max_duration: within its resolution below the true limit; started
    near the answer (where the analytic estimate puts it) with 10% growth, it needs few probes."""
    probes = []

    def fits(frames):
        probes.append(frames)
        return frames <= limit

    found = compile_cli.longest_fit(fits, start=1250, growth=growth)
    assert found <= limit and limit - found <= max(12.5, 0.02 * found)
    assert len(probes) <= (5 if limit in (1250, 1300) and growth == 1.1 else 60)


HLO = """HloModule step

%cond (p: (s32[], bf16[1,256])) -> pred[] {
  %p = (s32[]{:T(128)}, bf16[1,256]{1,0}) parameter(0)
  %constant.1 = s32[]{:T(128)} constant(21)
  %gte = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%gte, %constant.1), direction=LT
}

%body (p: (s32[], bf16[1,256])) -> (s32[], bf16[1,256]) {
  %p = (s32[]{:T(128)}, bf16[1,256]{1,0}) parameter(0)
  %x = bf16[1,256]{1,0} get-tuple-element(%p), index=1
  %ag = bf16[2,256]{1,0:T(8,128)(2,1)} all-gather(bf16[1,256]{1,0} %x), channel_id=1, replica_groups=[2,2]<=[4], dimensions={0}
  ROOT %t = (s32[]{:T(128)}, bf16[1,256]{1,0}) tuple(%i, %x)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[]{:T(128)}, bf16[1,256]{1,0}) while(%t0), condition=%cond, body=%body
  ROOT %ar = f32[8]{0:T(256)} all-reduce(f32[8]{0} %a), channel_id=2, replica_groups=[2,2]<=[2,2]T(1,0), to_apply=%add
}
"""


def test_collectives_count_loop_trips_axes_and_dcn():
    """An all-gather inside a 21-trip loop (TPU-style layouts) counts 21 times over fsdp; the all-reduce
    over data crosses the two slices: DCN."""
    import types

    import numpy as np

    devices = np.array([types.SimpleNamespace(id=i, slice_index=i // 2) for i in range(4)]).reshape(2, 2)
    mesh = types.SimpleNamespace(devices=devices, axis_names=("data", "fsdp"))
    c = topology.collectives(HLO, mesh)
    assert c["all-gather"]["count"] == 21 and c["all-gather"]["bytes"] == 21 * 2 * 256 * 2
    assert set(c["all-gather"]["by_axes"]) == {"fsdp"} and c["all-gather"]["dcn_count"] == 0
    assert c["all-reduce"]["count"] == 1 and c["all-reduce"]["bytes"] == 32
    assert set(c["all-reduce"]["by_axes"]) == {"data"} and c["all-reduce"]["dcn_count"] == 1
