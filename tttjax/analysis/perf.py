"""The performance model of a compiled step: predicted time per step, MFU and frames/s per chip,
from the optimized HLO (hlo.py, every loop's trip count applied) and a chip (chips.py).

    report = predict(hlo_text, mesh, chips.chip("v5e"), model_flops=..., frames_per_step=...,
                     slice_shape=(4, 4), attention_window=3000)

`predict` returns the dict `tttjax.compile` writes under `performance` (docs/distributed.md):
  flops_per_device   {dot, other, kernels, model, compiled_per_model}: the compiler's dot and
                     convolution FLOPs from their shapes, the rest (elementwise, reductions, one per
                     element), opaque kernels (Pallas splash attention, counted analytically:
                     `kernel_flops`), the analytic useful FLOPs (flops.py) and their ratio;
  hbm_bytes_per_device  operands + results of every top-level op (slice-aware; on-chip memory excluded);
  op_executions      top-level ops run per step (loops unrolled): where each costs a few microseconds
                     of launch and pipeline latency that the model does not add, this says how much;
  collectives        one row per (kind, mesh axes): count, bytes, link (ICI / DCN), the ring factor
                     applied, bandwidth and seconds;
  time_s             {compute, memory, collectives, ici, dcn}: compute is each dot's FLOPs at the
                     chip's peak times its MXU efficiency; memory the HBM bytes at HBM bandwidth;
  step_s             {overlap, roofline, serial}: overlap = max(compute, memory, collectives)
                     (everything overlapped: a lower bound); serial = their sum (nothing overlapped:
                     an upper bound for a bandwidth-bound program); roofline = max(the sum over ops of
                     max(op compute, op memory), collectives): ops run one after another on a
                     TensorCore, each overlapping its own loads with its math;
  mfu, frames_per_s_per_chip  for each of the three step times;
  bound              which of compute / memory / collectives sets the overlap bound;
  parts              per part of the model (PARTS): time (sum of max(compute, memory) of its ops),
                     compute, memory, collective seconds, dot FLOPs, MXU efficiency;
  mxu                the FLOP-weighted MXU efficiency and the dots that lose the most time to padding.

What it cannot see: latency (each loop iteration and each small op costs at least a few microseconds;
the TTT inner scan is T/K sequential steps), XLA's real overlap schedule, VMEM residency across ops,
the vector unit's own throughput, and contention between collectives sharing links.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Callable

import numpy as np
from jax.sharding import Mesh

from tttjax.analysis import hlo, topology
from tttjax.analysis import chips
from tttjax.analysis.chips import Chip, wraparound
from tttjax.analysis.flops import mean_context, train_step_flops
from tttjax.model.config import ModelConfig

# Parts of the model, by the Python that built each op (hlo stack frames, innermost first). A rule
# marked "anywhere" wins if its function is anywhere in the chain; otherwise the innermost frame that
# matches any rule decides. Unmatched ops (XLA's own copies, the step's plumbing) are "other".
ANYWHERE = [("optimizer", "/optax/"), ("optimizer", "train/optimizer.py"), ("depformer", "MoshiLM.depformer_logits")]
INNERMOST = [("ttt_inner_scan", "model/ttt_inner.py"), ("ttt_branch", "model/ttt.py"),
             ("temporal_attention", "Attention.__call__"), ("temporal_attention", "model/attention.py"),
             ("temporal_mlp", "GatedMLP.__call__"), ("temporal_other", "TransformerLayer.__call__"),
             ("temporal_other", "MoshiLM.temporal"), ("loss", "loss_terms"), ("loss", "token_cross_entropy"),
             ("heads", "MoshiLM._delayed_logits"), ("embeddings", "embed_inputs"), ("embeddings", "delay_codes"),
             ("optimizer", "all_finite")]
PARTS = ("temporal_attention", "temporal_mlp", "temporal_other", "ttt_branch", "ttt_inner_scan", "depformer",
         "heads", "embeddings", "loss", "optimizer", "other")


def part_of(functions: tuple[tuple[str, str], ...]) -> str:
    def matches(frame, needle):
        return needle in frame[0] or needle == frame[1]
    for part, needle in ANYWHERE:
        if any(matches(f, needle) for f in functions):
            return part
    for frame in functions:
        for part, needle in INNERMOST:
            if matches(frame, needle):
                return part
    return "other"


def mxu_efficiency(dot: hlo.Dot, tile: tuple[int, int, int]) -> float:
    """Useful share of the matrix unit for one dot: each of M, K, N padded to the chip's tile (128 on
    v4/v5e/v5p, 256 on v6e: a K x N weight tile fills the systolic array; streaming fewer than a tile
    of rows M does not hide the tile's load). A [16 x 128] @ [128 x 512] TTT matmul runs at 1/8."""
    eff = 1.0
    for size, t in zip((dot.m, dot.k, dot.n), tile):
        eff *= size / (math.ceil(size / t) * t) if size else 1.0
    return eff


def kernel_flops(kernel: dict, attention_window: int | None) -> float:
    """FLOPs of an opaque kernel XLA does not count: Pallas splash attention, from its q operand
    [..., T, d] and the causal window (keys per query rounded up to the kernel's key blocks). Matmuls
    per kernel: forward 2 (scores, weighted sum), dq 3 (scores, dP, dQ), dkv 4 (scores, dP, dV, dK)."""
    name = kernel.get("op_name", "")
    matmuls = 2 if "splash_mha_fwd" in name else 3 if "splash_mha_dq" in name else 4 if "splash_mha_dkv" in name else 0
    floats = [o["dims"] for o in kernel.get("operands", []) if len(o["dims"]) >= 3 and o["dtype"][0] in "fb"]
    if not matmuls or not floats:
        return 0.0
    q = floats[0]
    T, d = q[-2], q[-1]
    try:
        block = int(json.loads(kernel.get("metadata") or "{}").get("block_kv", 128))
    except ValueError:
        block = 128
    keys = min(T, mean_context(T, attention_window) + block / 2)
    return 2.0 * matmuls * math.prod(q[:-1]) * keys * d


def _ring_factor(kind: str, n: int) -> float:
    """Bytes each device moves per byte of the op's result (bidirectional ring, bandwidth-bound):
    all-gather (n-1)/n of the gathered array; reduce-scatter (n-1) shards; all-reduce 2(n-1)/n
    (a reduce-scatter then an all-gather); all-to-all (n-1)/n; collective-permute its buffer once."""
    if n <= 1:
        return 0.0
    return {"all-gather": (n - 1) / n, "reduce-scatter": n - 1, "all-reduce": 2 * (n - 1) / n,
            "all-to-all": (n - 1) / n, "collective-permute": 1.0}[kind]


def _ici_bandwidth(chip: Chip, members: list, slice_shape: tuple[int, ...] | None) -> float:
    """One-way bytes/s a device's share of a ring collective over `members` (devices) can use: on a
    torus, two links (one each way) per dimension the group spans, one where that dimension has no
    wraparound link; on a switched GPU node, its NVLink bandwidth."""
    if chip.torus_dims == 0:
        return chip.ici_link_bw
    coords = np.array([getattr(d, "coords", None) or [0] for d in members])
    spanned = [a for a in range(coords.shape[1]) if len(set(coords[:, a])) > 1] if coords.ndim == 2 else []
    wraps = wraparound(chip, slice_shape) if slice_shape else (False,) * 3
    links = sum(2 if a < len(wraps) and wraps[a] else 1 for a in spanned)
    return chip.ici_link_bw * max(1, links)


def _collective_rows(collectives: list[hlo.Collective], mesh: Mesh, chip: Chip, slice_shape, num_slices: int):
    flat = mesh.devices.reshape(-1)
    dcn_bw = chip.dcn_host_bw / chip.chips_per_host
    rows = {}
    for c in collectives:
        if c.groups is None:  # Megascale: the cross-slice part of a collective
            axes, n, dcn, bw = "+".join(topology.slice_axes(mesh)) or "none", max(num_slices, 2), True, dcn_bw
        else:
            axes = "+".join(topology.group_axes(c.groups, mesh)) or "none"
            n, dcn = len(c.groups[0]), topology.crosses_slices(c.groups, mesh)
            bw = dcn_bw if dcn else _ici_bandwidth(chip, [flat[i] for i in c.groups[0] if i < flat.size], slice_shape)
        factor = _ring_factor(c.kind, n)
        row = rows.setdefault((c.kind, axes, dcn), {"kind": c.kind, "axes": axes, "link": "DCN" if dcn else "ICI",
                                                   "count": 0, "bytes": 0, "wire_bytes": 0.0, "seconds": 0.0,
                                                   "group_size": n, "ring_factor": factor, "bandwidth": bw})
        row["count"] += c.times
        row["bytes"] += c.bytes * c.times
        row["wire_bytes"] += c.bytes * c.times * factor
        row["seconds"] += c.bytes * c.times * factor / bw
    return list(rows.values()), [(c, part_of(c.functions)) for c in collectives]


def _charge_ops(module: hlo.Module, chip: Chip, attention_window: int | None):
    """Each op's compute (dots at peak over their MXU efficiency, kernels at peak) and memory time,
    summed overall and by part; and every dot with the time padding costs it."""
    parts = {p: defaultdict(float) for p in PARTS}
    totals = defaultdict(float)
    dot_rows = []
    for op in hlo.ops(module):
        part = part_of(op.functions)
        compute = 0.0
        for dot in op.dots:
            eff = mxu_efficiency(dot, chip.mxu_tile)
            ideal = dot.flops * op.times / chip.bf16_flops
            seconds = ideal / max(eff, 1e-9)
            compute += seconds
            dot_part = part_of(dot.functions or op.functions)
            parts[dot_part]["dot_flops"] += dot.flops * op.times
            parts[dot_part]["ideal_s"] += ideal
            parts[dot_part]["mxu_s"] += seconds
            totals["dot"] += dot.flops * op.times
            totals["mxu_s"] += seconds
            dot_rows.append((seconds - ideal, dot, op.times, eff, dot_part))
        if op.kernel:
            flops = kernel_flops(op.kernel, attention_window) * op.times
            totals["kernels"] += flops
            compute += flops / chip.bf16_flops
        memory = op.hbm_bytes * op.times / chip.hbm_bw
        for key, value in (("other", op.other_flops * op.times), ("hbm", op.hbm_bytes * op.times),
                           ("compute_s", compute), ("memory_s", memory), ("roofline_s", max(compute, memory)),
                           ("op_executions", op.times)):
            totals[key] += value
        for key, value in (("op_executions", op.times), ("compute_s", compute), ("memory_s", memory),
                           ("time_s", max(compute, memory))):
            parts[part][key] += value
    dot_rows.sort(key=lambda r: -r[0])
    return parts, totals, dot_rows


def predict(text: str | hlo.Module, mesh: Mesh, chip: Chip, *, model_flops: float, frames_per_step: int,
            slice_shape: tuple[int, ...] | None = None, num_slices: int = 1,
            attention_window: int | None = None, top_dots: int = 8) -> dict:
    """The performance report of one compiled step (module docstring): `text` its optimized HLO (or
    an hlo.parse of it); `model_flops`: the analytic useful FLOPs of the whole step (all devices);
    `frames_per_step`: batch x frames."""
    module = hlo.parse(text) if isinstance(text, str) else text
    num_devices = mesh.devices.size
    chips_count = num_devices  # a v4 / v5p device is a chip (megacore), as on v5e / v6e and GPUs
    parts, totals, dot_rows = _charge_ops(module, chip, attention_window)
    rows, by_part = _collective_rows(hlo.collective_ops(module, num_devices), mesh, chip, slice_shape, num_slices)
    for c, part in by_part:
        parts[part]["collective_bytes"] += c.bytes * c.times
    ici = sum(r["seconds"] for r in rows if r["link"] == "ICI")
    dcn = sum(r["seconds"] for r in rows if r["link"] == "DCN")
    comm = ici + dcn
    compute, memory = totals["compute_s"], totals["memory_s"]
    step = {"overlap": max(compute, memory, comm), "roofline": max(totals["roofline_s"], comm),
            "serial": compute + memory + comm}
    per_device = model_flops / num_devices
    bound = max((compute, "compute"), (memory, "memory"), (comm, "collectives"))[1]
    part_table = {}
    for name, p in parts.items():
        if not any(p.values()):
            continue
        part_table[name] = {"time_s": p["time_s"], "compute_s": p["compute_s"], "memory_s": p["memory_s"],
                            "collective_bytes": int(p["collective_bytes"]), "dot_flops": p["dot_flops"],
                            "op_executions": int(p["op_executions"]),
                            "share": p["time_s"] / max(totals["roofline_s"], 1e-30),
                            "mxu_efficiency": p["ideal_s"] / p["mxu_s"] if p["mxu_s"] else None}
    return {
        "chip": chip.name, "chip_source": chip.source, "peak_flops": chip.bf16_flops, "hbm_bandwidth": chip.hbm_bw,
        "flops_per_device": {"dot": totals["dot"], "other": totals["other"], "kernels": totals["kernels"],
                             "model": per_device,
                             "compiled_per_model": (totals["dot"] + totals["kernels"]) / per_device if per_device else None},
        "hbm_bytes_per_device": totals["hbm"],
        "op_executions": int(totals["op_executions"]),
        "collectives": rows,
        "time_s": {"compute": compute, "memory": memory, "collectives": comm, "ici": ici, "dcn": dcn},
        "step_s": step,
        "mfu": {k: per_device / (v * chip.bf16_flops) if v else None for k, v in step.items()},
        "frames_per_s_per_chip": {k: frames_per_step / v / chips_count if v else None for k, v in step.items()},
        "bound": bound,
        "parts": part_table,
        "mxu": {"efficiency": (totals["dot"] / chip.bf16_flops) / max(totals["mxu_s"], 1e-30),
                "worst": [{"part": part, "batch": d.batch, "m": d.m, "k": d.k, "n": d.n, "efficiency": eff,
                           "executions": times, "lost_s": lost} for lost, d, times, eff, part in dot_rows[:top_dots]]},
    }


def step_rates(cfg: ModelConfig, *, batch_size: int, frames: int, full_finetuning: bool, devices) -> Callable:
    """For the trainer's log: `rates(seconds)` -> {frames_per_s_per_chip, mfu} of a step that took
    `seconds` (measured), MFU from the same useful FLOPs as the prediction (flops.py) against the
    chips.py peak of the devices (no MFU where the device is not in the table, e.g. a CPU)."""
    flops = train_step_flops(cfg, batch_size, frames, full_finetuning=full_finetuning)
    chip, n = chips.for_device(devices[0].device_kind), len(devices)

    def rates(seconds: float) -> dict:
        seconds = max(seconds, 1e-9)
        out = {"frames_per_s_per_chip": batch_size * frames / seconds / n}
        if chip is not None:
            out["mfu"] = flops / seconds / (n * chip.bf16_flops)
        return out

    return rates


def _s(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} us"


def format_performance(p: dict) -> list[str]:
    """The report's lines for `tttjax.compile` (predicted, not measured)."""
    f, t, s = p["flops_per_device"], p["time_s"], p["step_s"]
    mfu, fps = p["mfu"], p["frames_per_s_per_chip"]
    lines = [f"predicted    on {p['chip']} ({p['peak_flops'] / 1e12:.0f} TFLOP/s bf16, {p['hbm_bandwidth'] / 1e9:.0f} GB/s HBM; "
             f"chips.py): step {_s(s['overlap'])} all overlapped .. {_s(s['serial'])} none, {_s(s['roofline'])} op by op; "
             f"bound by {p['bound']}",
             f"             MFU {mfu['overlap']:.1%} .. {mfu['serial']:.1%} ({mfu['roofline']:.1%} op by op); frames/s per chip "
             f"{fps['overlap']:.4g} .. {fps['serial']:.4g} ({fps['roofline']:.4g})",
             f"             compute {_s(t['compute'])}, HBM {_s(t['memory'])} ({p['hbm_bytes_per_device'] / 2 ** 30:.2f} GiB), "
             f"collectives {_s(t['collectives'])} (ICI {_s(t['ici'])}, DCN {_s(t['dcn'])})",
             f"flops/device dots {f['dot']:.3e}, kernels {f['kernels']:.3e}, other {f['other']:.3e}; useful (model) "
             f"{f['model']:.3e}: compiled / useful {f['compiled_per_model'] or 0:.2f}"
             + (f"; MXU efficiency {p['mxu']['efficiency']:.0%}" if p["mxu"]["efficiency"] is not None else "")]
    parts = sorted(p["parts"].items(), key=lambda kv: -kv[1]["time_s"])
    lines.append("by part      " + ", ".join(
        f"{name} {v['share']:.0%}" + (f" (MXU {v['mxu_efficiency']:.0%})" if v["mxu_efficiency"] is not None else "")
        for name, v in parts if (v["share"] or 0) >= 0.005))
    return lines
