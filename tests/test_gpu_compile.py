"""`tttjax.compile --topology=h100-8`: a deviceless compile for an NVIDIA node through JAX's CUDA
plugin and a GPU target config (no GPU, no CUDA libraries). The plugin is a ~180 MB download that
CI does not install: the compile test skips without it; the name parsing always runs."""

import json

import pytest

import micro
from tttjax import compile as compile_cli
from tttjax.analysis import chips, topology

needs_cuda_plugin = pytest.mark.skipif(not topology.cuda_plugin_installed(),
                                       reason=f"JAX's CUDA plugin is not installed ({topology.GPU_PLUGIN})")


def test_gpu_node_names():
    t = topology.topology("h200-8", num_slices=2)
    assert (t.platform, t.chips, t.name, t.chip.name) == ("gpu", 16, "2 x h200-8", "h200")
    assert t.hbm_per_device(16) == chips.CHIPS["h200"].hbm_bytes
    with pytest.raises(ValueError, match="1, 2, 4 or 8 GPUs"):
        topology.topology("h100-16")
    config = topology.gpu_target_config(chips.CHIPS["h100"], "NVIDIA H100 80GB HBM3")
    assert f"device_memory_size: {chips.CHIPS['h100'].hbm_bytes}" in config and "major: 9" in config


def test_without_the_cuda_plugin_a_gpu_topology_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(topology, "cuda_plugin_installed", lambda: False)
    assert compile_cli.main(micro.cli() + ["--topology=h100-8"]) == 1
    assert "needs JAX's CUDA plugin: pip install --no-deps jax-cuda12-plugin" in capsys.readouterr().err


@needs_cuda_plugin
def test_compiles_for_an_h100_node_without_a_gpu(tmp_path, capsys):
    out = tmp_path / "report.json"
    code = compile_cli.main(micro.cli(mesh__data=1, mesh__fsdp=-1, batch_size=8, duration_sec=1.28)
                            + ["--topology=h100-8", "--no_eval", f"--output_json={out}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(out.read_text())
    assert report["device_kind"] == "NVIDIA H100 80GB HBM3" and report["mesh"]["fsdp"] == 8
    assert report["per_device"]["temp_bytes"] > 0 and report["fits"]
    perf = report["performance"]
    assert perf["chip"] == "h100" and perf["step_s"]["overlap"] > 0
    assert report["collectives"]["all-gather"]["count"] > 0  # FSDP over the node's NVLink
