"""The performance model (tttjax/analysis/hlo.py, perf.py): the HLO walk on synthetic HLO of known
cost (nested loops, slices, in-place updates, convolutions written as batched dots, collectives),
then real compiled programs (CPU, and a TPU AOT compile) whose FLOPs are counted independently."""

import importlib.util
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tttjax.analysis import chips, hlo, perf

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (.ci/run installs it)")

# An outer loop of 3 trips (XLA's known_trip_count) around an inner loop whose bound is only in its
# condition (5). The inner body runs a dot [8,128] x [128,256] and a fusion that reads one [128,256]
# layer of a stacked [6,128,256] weight (dynamic-slice) and writes one row into a [6,8,256] buffer in
# place (dynamic-update-slice). The outer body all-gathers a [2,256] bf16 shard to [4,256] over pairs of
# devices; the entry all-reduces 8 floats over the other pairs.
SYNTHETIC = """HloModule synthetic

%fused_slice_update (param_0: f32[6,128,256], param_1: f32[6,8,256], param_2: s32[]) -> f32[6,8,256] {
  %param_0 = f32[6,128,256]{2,1,0} parameter(0)
  %param_2 = s32[] parameter(2)
  %zero = s32[] constant(0)
  %layer = f32[1,128,256]{2,1,0} dynamic-slice(%param_0, %param_2, %zero, %zero), dynamic_slice_sizes={1,128,256}
  %row = f32[1,8,256]{2,1,0} slice(%layer), slice={[0:1], [0:8], [0:256]}
  %param_1 = f32[6,8,256]{2,1,0} parameter(1)
  ROOT %dus = f32[6,8,256]{2,1,0} dynamic-update-slice(%param_1, %row, %param_2, %zero, %zero)
}

%inner_cond (p: (s32[], f32[8,128])) -> pred[] {
  %p = (s32[], f32[8,128]{1,0}) parameter(0)
  %bound = s32[] constant(5)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %bound), direction=LT
}

%inner_body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %p = (s32[], f32[8,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,128]{1,0} get-tuple-element(%p), index=1
  %w = f32[128,256]{1,0} parameter(1)
  %stack = f32[6,128,256]{2,1,0} parameter(2)
  %buffer = f32[6,8,256]{2,1,0} parameter(3)
  %y = f32[8,256]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/dot_general" stack_frame_id=2}
  %updated = f32[6,8,256]{2,1,0} fusion(%stack, %buffer, %i), kind=kLoop, calls=%fused_slice_update
  ROOT %t = (s32[], f32[8,128]{1,0}) tuple(%i, %x)
}

%outer_body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %p = (s32[], f32[8,128]{1,0}) parameter(0)
  %shard = bf16[2,256]{1,0} parameter(1)
  %inner = (s32[], f32[8,128]{1,0}) while(%p), condition=%inner_cond, body=%inner_body
  %gathered = bf16[4,256]{1,0:T(8,128)(2,1)} all-gather(%shard), channel_id=1, replica_groups=[2,2]<=[4], dimensions={0}
  ROOT %r = (s32[], f32[8,128]{1,0}) tuple(%p, %p)
}

%outer_cond (p: (s32[], f32[8,128])) -> pred[] {
  %p = (s32[], f32[8,128]{1,0}) parameter(0)
  %big = s32[] constant(1000)
  ROOT %lt = pred[] compare(%p, %big), direction=LT
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %start = (s32[], f32[8,128]{1,0}) parameter(1)
  %loop = (s32[], f32[8,128]{1,0}) while(%start), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %ar = f32[8]{0} all-reduce(%a), channel_id=2, replica_groups=[2,2]<=[2,2]T(1,0), to_apply=%add
}

FileNames
1 "/src/tttjax/model/transformer.py"

FunctionNames
1 "GatedMLP.__call__"
2 "TransformerLayer.__call__"

FileLocations
1 {file_name_id=1 function_name_id=1 line=121 end_line=121 column=1 end_column=1}
2 {file_name_id=1 function_name_id=2 line=154 end_line=154 column=1 end_column=1}

StackFrames
1 {file_location_id=2 parent_frame_id=1}
2 {file_location_id=1 parent_frame_id=2}
"""

DOT_FLOPS = 2 * 8 * 128 * 256
# A chip with round numbers: 1 TFLOP/s, 1 GB/s of HBM, 10 GB/s per ICI link, a 128 tile.
TOY = chips.Chip("toy", 1e12, 2 ** 30, 1e9, 1e10, 4, 1e9, 2, (128, 128, 128), 2, "test")


def _mesh(slices: int = 1):
    """2 x 2 devices (data, fsdp) with torus coordinates; with 2 slices, data crosses them."""
    devices = np.array([types.SimpleNamespace(id=i, coords=[i % 2, i // 2, 0], slice_index=i // 2 if slices > 1 else 0)
                        for i in range(4)]).reshape(2, 2)
    return types.SimpleNamespace(devices=devices, axis_names=("data", "fsdp"))


def test_the_walk_applies_nested_trip_counts_slices_and_in_place_updates():
    module = hlo.parse(SYNTHETIC)
    assert module.executions["inner_body"] == 15 and module.executions["outer_body"] == 3
    ops = {op.name: op for op in hlo.ops(module)}
    dot = ops["y"]
    assert dot.times == 15 and [(d.batch, d.m, d.k, d.n) for d in dot.dots] == [(1, 8, 128, 256)]
    assert dot.dots[0].flops == DOT_FLOPS
    assert dot.hbm_bytes == 4 * (8 * 128 + 128 * 256 + 8 * 256)  # operands + result
    # the fusion reads one [1,128,256] layer of the stack (not all 6), and writes one [1,8,256] row
    # in place: the [6,8,256] buffer is neither read nor rewritten whole
    assert ops["updated"].hbm_bytes == 4 * (128 * 256 + 8 * 256) + 4  # + the s32 index
    # the source of each op, from the stack-frame table (innermost first)
    assert [f for _, f in dot.functions] == ["GatedMLP.__call__", "TransformerLayer.__call__"]
    assert perf.part_of(dot.functions) == "temporal_mlp"


def test_collectives_of_known_cost():
    module = hlo.parse(SYNTHETIC)
    by_kind = {c.kind: c for c in hlo.collective_ops(module, 4)}
    gather, reduce = by_kind["all-gather"], by_kind["all-reduce"]
    assert (gather.times, gather.bytes, gather.groups) == (3, 4 * 256 * 2, [[0, 1], [2, 3]])
    assert (reduce.times, reduce.bytes, reduce.groups) == (1, 32, [[0, 2], [1, 3]])

    report = perf.predict(SYNTHETIC, _mesh(slices=2), TOY, model_flops=4 * 15 * DOT_FLOPS, frames_per_step=100,
                          slice_shape=(2, 2))
    rows = {r["kind"]: r for r in report["collectives"]}
    # the all-gather over fsdp (members differ in one torus coordinate, no wraparound at 2): one link,
    # a ring moves (n-1)/n of the gathered array
    ag = rows["all-gather"]
    assert (ag["axes"], ag["link"], ag["group_size"], ag["ring_factor"]) == ("fsdp", "ICI", 2, 0.5)
    assert ag["seconds"] == pytest.approx(3 * 2048 * 0.5 / 1e10)
    # the all-reduce over data crosses the slices: DCN at the host's bandwidth shared by its 2 chips,
    # 2(n-1)/n of the array
    ar = rows["all-reduce"]
    assert (ar["axes"], ar["link"], ar["ring_factor"]) == ("data", "DCN", 1.0)
    assert ar["seconds"] == pytest.approx(32 * 1.0 / (1e9 / 2))


def test_predicted_step_bounds_mfu_and_mxu_padding():
    report = perf.predict(SYNTHETIC, _mesh(), TOY, model_flops=4 * 15 * DOT_FLOPS, frames_per_step=100,
                          slice_shape=(2, 2))
    # M = 8 rows of a 128 tile: the dot uses 1/16 of the matrix unit, so its time is 16x its FLOPs
    eff = 8 / 128
    compute = 15 * DOT_FLOPS / (1e12 * eff)
    assert report["flops_per_device"]["dot"] == 15 * DOT_FLOPS
    assert report["time_s"]["compute"] == pytest.approx(compute)
    assert report["mxu"]["efficiency"] == pytest.approx(eff)
    memory = 15 * (4 * (8 * 128 + 128 * 256 + 8 * 256) + 4 * (128 * 256 + 8 * 256) + 4) / 1e9
    assert report["time_s"]["memory"] == pytest.approx(memory)
    comm = report["time_s"]["collectives"]
    assert comm == pytest.approx(3 * 2048 * 0.5 / 1e10 + 32 * 1.0 / 1e10)  # both over ICI in one slice
    s = report["step_s"]
    assert s["overlap"] == pytest.approx(max(compute, memory, comm))
    assert s["serial"] == pytest.approx(compute + memory + comm)
    assert s["overlap"] <= s["roofline"] <= s["serial"]
    assert report["bound"] == "memory"
    # MFU: the useful FLOPs per device over the step at peak; frames/s per chip
    assert report["mfu"]["overlap"] == pytest.approx(15 * DOT_FLOPS / (s["overlap"] * 1e12))
    assert report["frames_per_s_per_chip"]["serial"] == pytest.approx(100 / s["serial"] / 4)
    assert set(report["parts"]) == {"temporal_mlp", "other"}


def test_a_batched_dot_written_as_a_convolution():
    """XLA:TPU writes batch dimensions as spatial ones with a dilated window; 8 matmuls of
    [32 x 64] @ [64 x 2] count as 8, not as a 64-tap convolution."""
    text = """HloModule conv
ENTRY %main (a: bf16[8,32,64], b: bf16[8,64,2]) -> bf16[8,32,2] {
  %a = bf16[8,32,64]{2,1,0} parameter(0)
  %b = bf16[8,64,2]{2,1,0} parameter(1)
  ROOT %c = bf16[8,32,2]{2,1,0} convolution(%a, %b), window={size=8 stride=7 lhs_dilate=8}, dim_labels=0bf_0io->0bf
}
"""
    [op] = [o for o in hlo.ops(hlo.parse(text)) if o.dots]
    [dot] = op.dots
    assert (dot.batch, dot.m, dot.k, dot.n) == (8, 32, 64, 2)
    assert dot.flops == 2 * 8 * 32 * 64 * 2
    assert perf.mxu_efficiency(dot, (128, 128, 128)) == pytest.approx(32 / 128 * 64 / 128 * 2 / 128)


def test_ici_bandwidth_counts_the_torus_dimensions_a_group_spans():
    v5e = chips.chip("v5e")
    row = [types.SimpleNamespace(coords=[x, 0, 0]) for x in range(4)]
    plane = [types.SimpleNamespace(coords=[x, y, 0]) for x in range(4) for y in range(4)]
    assert perf._ici_bandwidth(v5e, row, (4, 4)) == v5e.ici_link_bw  # a line: no wraparound below 16
    assert perf._ici_bandwidth(v5e, plane, (4, 4)) == 2 * v5e.ici_link_bw
    assert perf._ici_bandwidth(v5e, plane, (16, 16)) == 4 * v5e.ici_link_bw  # full rings both ways
    assert chips.wraparound(chips.chip("v5p"), (2, 2, 4)) == (False,) * 3  # not whole 4x4x4 cubes
    with pytest.raises(ValueError, match="unknown chip 'v7'"):
        chips.chip("v7")


def _scanned_matmuls(x, w):
    """A scan of 10 steps, each a fori_loop of 3 matmuls [B, 256] @ [256, 256]: 30 matmuls."""
    def step(h, _):
        h = jax.lax.fori_loop(0, 3, lambda i, g: jnp.tanh(g @ w), h)
        return h, None
    return jax.lax.scan(step, x, None, length=10)[0]


def _count(compiled, num_devices: int, batch: int) -> tuple[float, float]:
    module = hlo.parse(compiled.as_text())
    walked = sum(d.flops * op.times for op in hlo.ops(module) for d in op.dots)
    return walked, 30 * 2 * (batch // num_devices) * 256 * 256


def test_a_compiled_cpu_program_counts_every_loop_trip():
    x, w = jnp.ones((64, 256)), jnp.ones((256, 256))
    compiled = jax.jit(_scanned_matmuls).lower(x, w).compile()
    walked, expected = _count(compiled, 1, 64)
    assert walked == expected
    xla = compiled.cost_analysis()
    xla = (xla[0] if isinstance(xla, (list, tuple)) else xla)["flops"]
    assert xla < expected / 5  # XLA's own count sees each loop body once


@needs_libtpu
def test_a_tpu_aot_program_counts_every_loop_trip():
    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    mesh = Mesh(np.array(devices), ("batch",))
    x = jax.ShapeDtypeStruct((64, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P("batch")))
    w = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    compiled = jax.jit(_scanned_matmuls).lower(x, w).compile()
    walked, expected = _count(compiled, 4, 64)
    assert walked == expected  # per device: a quarter of the batch
    report = perf.predict(compiled.as_text(), mesh, chips.chip("v5e"), model_flops=4 * expected,
                          frames_per_step=64, slice_shape=(2, 2))
    # 16 rows per device of a 128 tile: the dots run at 1/8 of the MXU
    assert report["mxu"]["efficiency"] == pytest.approx(16 / 128)
    assert report["mfu"]["overlap"] <= 16 / 128 + 1e-9


def test_the_trainers_rates_use_the_useful_flops_and_the_chips_peak():
    from configs import tiny
    from tttjax.analysis.flops import train_step_flops
    from tttjax.model.config import from_run_config

    cfg = from_run_config(tiny.get_config())
    devices = [types.SimpleNamespace(device_kind="TPU v5 lite")] * 4
    rates = perf.step_rates(cfg, batch_size=8, frames=50, full_finetuning=False, devices=devices)(0.5)
    assert rates["frames_per_s_per_chip"] == pytest.approx(8 * 50 / 0.5 / 4)
    assert rates["mfu"] == pytest.approx(train_step_flops(cfg, 8, 50, full_finetuning=False) / 0.5 / (4 * 197e12))
    assert chips.for_device("TPU v5") is chips.CHIPS["v5p"] and chips.for_device("NVIDIA H200") is chips.CHIPS["h200"]
    cpu = perf.step_rates(cfg, batch_size=8, frames=50, full_finetuning=False,
                          devices=[types.SimpleNamespace(device_kind="cpu")])(0.5)
    assert "mfu" not in cpu


def test_convolution_taps_match_a_direct_count():
    """The closed-form count of (output, tap) pairs that land on real input elements (padding, strides,
    lhs and rhs dilation) against enumerating them, on random windows."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        w = {"size": int(rng.integers(1, 10)), "stride": int(rng.integers(1, 9)), "lo": int(rng.integers(0, 5)),
             "hi": 0, "lhs_dilate": int(rng.integers(1, 9)), "rhs_dilate": int(rng.integers(1, 4))}
        size_in, size_out = int(rng.integers(1, 11)), int(rng.integers(1, 13))
        span = (size_in - 1) * w["lhs_dilate"]
        positions = [o * w["stride"] + k * w["rhs_dilate"] - w["lo"] for o in range(size_out) for k in range(w["size"])]
        direct = sum(1 for p in positions if 0 <= p <= span and p % w["lhs_dilate"] == 0)
        assert hlo._valid_taps(size_in, size_out, w) == direct, (w, size_in, size_out)


def test_a_cublas_gemm_counts_as_a_dot():
    """XLA:GPU writes dots as cuBLAS custom calls whose backend config carries the dimension numbers
    (the form of XLA's GPU HLO; no GPU compile is available here to take one from)."""
    text = """HloModule gemm
ENTRY %main (a: bf16[4,64,256], b: bf16[4,256,128]) -> (bf16[4,64,128], s8[1024]) {
  %a = bf16[4,64,256]{2,1,0} parameter(0)
  %b = bf16[4,256,128]{2,1,0} parameter(1)
  ROOT %g = (bf16[4,64,128]{2,1,0}, s8[1024]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":{"lhs_contracting_dimensions":["2"],"rhs_contracting_dimensions":["1"],"lhs_batch_dimensions":["0"],"rhs_batch_dimensions":["0"]}}}
}
"""
    [op] = hlo.ops(hlo.parse(text))
    [dot] = op.dots
    assert (dot.batch, dot.m, dot.k, dot.n, dot.flops) == (4, 64, 256, 128, 2 * 4 * 64 * 256 * 128)
