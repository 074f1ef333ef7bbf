"""Weight gathers (tttjax/analysis/gathers.py, and what hlo.py must get right for them): loops that
count by a step other than 1, XLA:TPU's async collective chains counted once, the data flow from a
collective back to the weight it moves, and the analytic minimum for each frozen-weight placement."""

import pytest

from configs import tiny
from tttjax.analysis import gathers, hlo
from tttjax.model.config import from_run_config

# Weight `frozen['w']` [64,32] bf16 is stored in 4 shards [16,32] and gathered twice:
# - once by an async collective chain (XLA:TPU's collective fusion): a start fusion and two
#   continuation fusions print the same all-gather (channel 7, chain 3): one gather of 4 KiB;
# - once by a windowed-einsum loop that passes the shard around a ring with a collective-permute per
#   trip; its u32 counter runs 0, 2, 4, 6 below 8: 4 trips of 1 KiB each.
# The entry also all-gathers an activation (`codes`, computed by an add): not a weight.
SYNTHETIC = """HloModule gathers

%ag_start (param_0: bf16[16,32]) -> (bf16[16,32], bf16[64,32]) {
  %param_0 = bf16[16,32]{1,0} parameter(0)
  %all-gather.1 = bf16[64,32]{1,0} all-gather(%param_0), channel_id=7, replica_groups=[1,4]<=[4], dimensions={0}, frontend_attributes={chain_id="3"}
  ROOT %cc = (bf16[16,32]{1,0}, bf16[64,32]{1,0}) custom-call(%all-gather.1), custom_call_target="AsyncCollectiveStart"
}

%async_collective_fusion.1 (param_0: bf16[16,32], param_1: f32[8]) -> (f32[8], bf16[64,32]) {
  %param_0 = bf16[16,32]{1,0} parameter(0)
  %param_1 = f32[8]{0} parameter(1)
  %all-gather.2 = bf16[64,32]{1,0} all-gather(%param_0), channel_id=7, replica_groups=[1,4]<=[4], dimensions={0}, frontend_attributes={chain_id="3"}
  %neg = f32[8]{0} negate(%param_1)
  ROOT %t = (f32[8]{0}, bf16[64,32]{1,0}) tuple(%neg, %all-gather.2)
}

%async_collective_fusion.2 (param_0: bf16[16,32], param_1: f32[8]) -> (f32[8], bf16[64,32]) {
  %param_0 = bf16[16,32]{1,0} parameter(0)
  %param_1 = f32[8]{0} parameter(1)
  %all-gather.3 = bf16[64,32]{1,0} all-gather(%param_0), channel_id=7, replica_groups=[1,4]<=[4], dimensions={0}, frontend_attributes={chain_id="3"}
  %abs = f32[8]{0} abs(%param_1)
  ROOT %t = (f32[8]{0}, bf16[64,32]{1,0}) tuple(%abs, %all-gather.3)
}

%ring_cond (p: (bf16[16,32], u32[])) -> pred[] {
  %p = (bf16[16,32]{1,0}, u32[]) parameter(0)
  %i = u32[] get-tuple-element(%p), index=1
  %bound = u32[] constant(8)
  ROOT %lt = pred[] compare(%i, %bound), direction=LT
}

%ring_body (p: (bf16[16,32], u32[])) -> (bf16[16,32], u32[]) {
  %p = (bf16[16,32]{1,0}, u32[]) parameter(0)
  %shard = bf16[16,32]{1,0} get-tuple-element(%p), index=0
  %i = u32[] get-tuple-element(%p), index=1
  %cp = (bf16[16,32]{1,0}, bf16[16,32]{1,0}, u32[], u32[]) collective-permute-start(%shard), channel_id=9, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %next = bf16[16,32]{1,0} collective-permute-done(%cp)
  %two = u32[] constant(2)
  %i2 = u32[] add(%i, %two)
  ROOT %t = (bf16[16,32]{1,0}, u32[]) tuple(%next, %i2)
}

ENTRY %main (w: bf16[16,32], codes: f32[8]) -> f32[8] {
  %w = bf16[16,32]{1,0} parameter(0), metadata={op_name="frozen[\\'w\\']"}
  %codes = f32[8]{0} parameter(1), metadata={op_name="codes"}
  %started = (bf16[16,32]{1,0}, bf16[64,32]{1,0}) fusion(%w), kind=kCustom, calls=%ag_start
  %mid = (f32[8]{0}, bf16[64,32]{1,0}) fusion(%w, %codes), kind=kLoop, calls=%async_collective_fusion.1
  %x = f32[8]{0} get-tuple-element(%mid), index=0
  %end = (f32[8]{0}, bf16[64,32]{1,0}) fusion(%w, %x), kind=kLoop, calls=%async_collective_fusion.2
  %zero = u32[] constant(0)
  %copy = u32[] copy(%zero)
  %init = (bf16[16,32]{1,0}, u32[]) tuple(%w, %copy)
  %ring = (bf16[16,32]{1,0}, u32[]) while(%init), condition=%ring_cond, body=%ring_body
  %y = f32[8]{0} get-tuple-element(%end), index=0
  %act = f32[8]{0} add(%codes, %y)
  %gathered = f32[32]{0} all-gather(%act), channel_id=11, replica_groups=[1,4]<=[4], dimensions={0}
  ROOT %out = f32[8]{0} slice(%gathered), slice={[0:8]}
}
"""

WEIGHT = 64 * 32 * 2  # the gathered [64,32] bf16 weight
SHARD = WEIGHT // 4


def test_loops_counting_by_two_and_collective_chains_counting_once():
    module = hlo.parse(SYNTHETIC)
    assert module.executions["ring_body"] == 4  # u32 0, 2, 4, 6 < 8 (the condition's constant alone says 8)
    by_kind = {}
    for c in hlo.collective_ops(module, 4):
        by_kind.setdefault(c.kind, []).append(c)
    gathers_ = by_kind["all-gather"]
    assert sorted((c.bytes, c.times) for c in gathers_) == [(32 * 4, 1), (WEIGHT, 1)]  # the chain once
    assert [(c.bytes, c.times) for c in by_kind["collective-permute"]] == [(SHARD, 4)]
    # A continuation fusion's HBM bytes: the shard its collective reads and its own f32[8] in and out;
    # the gathered result is the network's to write (the collective's time counts it)
    mid = next(op for op in hlo.ops(module) if op.name == "mid")
    assert mid.hbm_bytes == SHARD + 2 * 8 * 4


def test_compiled_gathers_follow_the_data_to_the_weight():
    moved = gathers.compiled_gathers(hlo.parse(SYNTHETIC), 4)
    # the chain's gather and the ring's 4 shards are the weight's; the activation gather is not
    assert moved == {"w": WEIGHT + 4 * SHARD}


def _tiny(**changes):
    c = tiny.get_config()
    c.param_dtype = "bfloat16"
    c.remat = "full"
    for k, v in changes.items():
        c[k] = v
    return from_run_config(c)


@pytest.mark.parametrize("placement", ["sharded", "gather_once", "replicated"])
def test_minimum_gathers_by_placement_and_microbatches(placement):
    """Against a count written out by hand for the tiny model: every weight split over fsdp, two passes
    per microbatch under remat (one for an embedding table, for a head outside the layer stacks, and
    without remat), frozen weights per their placement."""
    cfg = _tiny()
    mesh = {"data": 1, "fsdp": 4, "tensor": 1}
    got = gathers.minimum_gathers(cfg, mesh, num_microbatches=2, frozen_weights=placement)
    D, L = cfg.dim, cfg.num_layers
    in_proj = L * D * 3 * D * 2  # bytes of the stacked frozen kernel, bf16
    text_emb = (cfg.text_card + 1) * D * 2
    expect_in_proj = {"sharded": 2 * 2 * in_proj, "gather_once": in_proj, "replicated": None}[placement]
    expect_emb = {"sharded": 2 * text_emb, "gather_once": text_emb, "replicated": None}[placement]
    assert got.get("transformer.self_attn.in_proj.kernel") == expect_in_proj
    assert got.get("text_emb") == expect_emb
    lora_a = L * D * cfg.lora_rank * 2  # trainable, split over fsdp: always 2 passes per microbatch
    assert got["transformer.self_attn.in_proj.lora_a"] == 2 * 2 * lora_a
    # the text head runs outside the rematerialised stacks: its forward's gather serves the backward
    assert got["text_linear.lora_a"] == 2 * D * cfg.lora_rank * 2
    assert gathers.minimum_gathers(cfg, {"data": 4, "fsdp": 1, "tensor": 1}) == {}  # nothing split over fsdp
    no_remat = gathers.minimum_gathers(_tiny(remat="none"), mesh, num_microbatches=2, frozen_weights=placement)
    if placement == "sharded":  # without remat the backward reads the forward's gathered weight
        assert no_remat["transformer.self_attn.in_proj.kernel"] == 2 * in_proj
    assert no_remat["transformer.self_attn.in_proj.lora_a"] == 2 * lora_a


def test_reconcile_reports_the_ratio_and_the_params_over_their_minimum():
    r = gathers.reconcile({"a": 100, "b": 50}, {"a": 100, "b": 80, "c": 5}, trainable_paths={"b"})
    assert r["minimum_bytes"] == 150 and r["compiled_bytes"] == 185 and r["ratio"] == pytest.approx(185 / 150)
    assert r["frozen"] == {"minimum_bytes": 100, "compiled_bytes": 105}
    assert [row["param"] for row in r["most_over"]] == ["b", "c"]
