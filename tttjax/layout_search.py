"""`python -m tttjax.compile --search`: candidate layouts of a run for a topology, compiled and ranked by
predicted step time.

A layout is a mesh factorization (data, fsdp, tensor over one slice's devices; slices join over
DCN as data), a remat policy, a microbatch count, for adapters on a frozen base where the base
lives (`frozen_weights`), and on TPU whether XLA compiles the weight gathers as windowed einsums
(`windowed_einsum`). Candidates the batch cannot split over, or whose analytic memory estimate
is over the chip's HBM by more than the estimate's measured spread around the compiler (0.8-1.35x
the compiler's figure, docs/distributed.md), are dropped before any compile; microbatching is
tried only where the whole batch does not fit (it adds weight gathers and buys only memory). The
rest are compiled in the order of a rough analytic step time (`prior_seconds`: the useful FLOPs
with the remat policy's recompute at the chip's peak, against the minimum weight gathers, tensor
parallelism's activation all-reduces and data parallelism's gradient all-reduce at ICI rates) up
to a budget, each by `compile_fn` (tttjax.compile's `compile_run`), and ranked by the performance
model's overlap-bound step time (analysis/perf.py) of its compiled program. A TPU program with
collective-permutes (XLA's windowed einsums) is compiled next with them off: the same layout as
plain all-gathers, which the model predicts faster where the rings cut the matmuls into per-shard
pieces (v5e-16, BENCHMARKS.md); the budget counts both compiles.

With `layers` set, each candidate compiles twice with the temporal stack cut to fewer plain layers
(the TTT layers kept, moved to the front), and every figure is extrapolated linearly in the
number of plain layers to the full model (`extrapolate`; BENCHMARKS.md gives its error against a
full compile).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable

from tttjax.analysis import gathers, memory
from tttjax.analysis.flops import train_step_flops
from tttjax.data.streams import num_frames
from tttjax.model.config import REMAT_MODES, from_run_config
from tttjax.model.params import flat_abstract, trainable

RECOMPUTE = {"none": 1.0, "dots": 1.1, "full": 1.4, "save_qkv": 1.3}  # compiled / useful FLOPs, 7B step
MICROBATCHES = (1, 2, 4)
ESTIMATE_EXCESS = 1.25  # the estimate runs 0.80-1.35x the compiler: a candidate estimated 25% over HBM may fit
TENSOR_SIZES = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Layout:
    data: int
    fsdp: int
    tensor: int
    remat: str
    num_microbatches: int
    frozen_weights: str
    windowed_einsum: bool = True

    def overrides(self, dcn_data: int) -> dict:
        """The config keys that select this layout (mesh sizes per slice)."""
        return {"mesh.data": self.data // dcn_data, "mesh.fsdp": self.fsdp, "mesh.tensor": self.tensor,
                "mesh.dcn_data": dcn_data, "remat": self.remat, "num_microbatches": self.num_microbatches,
                "frozen_weights": self.frozen_weights, "windowed_einsum": self.windowed_einsum}

    def describe(self) -> str:
        return (f"data={self.data} fsdp={self.fsdp} tensor={self.tensor} remat={self.remat} "
                f"micro={self.num_microbatches} frozen={self.frozen_weights}"
                f"{'' if self.windowed_einsum else ' windowed_einsum=off'}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def apply(config, layout: Layout, dcn_data: int):
    """A copy of `config` with the layout's keys set."""
    c = config.copy_and_resolve_references()
    for key, value in layout.overrides(dcn_data).items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def prior_seconds(config, layout: Layout, chip, num_devices: int) -> float:
    """A rough step time of `layout` before compiling: max(compute, collectives) (module docstring)."""
    cfg = dataclasses.replace(from_run_config(config), remat=layout.remat)
    frames = num_frames(config.duration_sec)
    full = bool(config.full_finetuning)
    compute = train_step_flops(cfg, config.batch_size, frames, full_finetuning=full) / num_devices \
        * RECOMPUTE[layout.remat] / chip.bf16_flops
    mesh = {"data": layout.data, "fsdp": layout.fsdp, "tensor": layout.tensor}
    ring = 2 * chip.ici_link_bw  # a ring uses a link each way
    wire = sum(gathers.minimum_gathers(cfg, mesh, full_finetuning=full, num_microbatches=layout.num_microbatches,
                                       frozen_weights=layout.frozen_weights).values()) * (1 - 1 / max(layout.fsdp, 1))
    if layout.tensor > 1:  # two all-reduces of the residual stream per layer, forward and backward (+ recompute)
        tokens = config.batch_size * frames / (layout.data * layout.fsdp)
        passes = 2 + (layout.remat in ("full", "save_qkv"))
        wire += (2 * passes * (cfg.num_layers + cfg.depformer_num_layers) * tokens * cfg.dim * 2
                 * 2 * (1 - 1 / layout.tensor))
    if layout.data > 1:  # the trainable gradients' all-reduce (fp32)
        grads = sum(math.prod(v.shape) for p, v in flat_abstract(cfg).items() if trainable(p, full))
        wire += 4 * grads / (layout.fsdp * layout.tensor) * 2 * (1 - 1 / layout.data)
    return max(compute, wire / ring)


def candidates(config, num_devices: int, num_slices: int, hbm_bytes: int) -> list[tuple[Layout, int]]:
    """(layout, estimated bytes per device) of every layout worth compiling."""
    cfg = from_run_config(config)
    per_slice = num_devices // num_slices
    placements = ("sharded",) if config.full_finetuning else ("sharded", "gather_once", "replicated")
    found = []
    for tensor in (t for t in TENSOR_SIZES if per_slice % t == 0 and cfg.num_heads % t == 0):
        for fsdp in _divisors(per_slice // tensor):
            data = per_slice // tensor // fsdp * num_slices
            for remat, placement in itertools.product(REMAT_MODES, placements):
                if fsdp == 1 and placement != "sharded":
                    continue  # nothing is split over fsdp: every placement is the same program
                fits_whole = None
                for micro in MICROBATCHES:
                    if config.batch_size % micro or (config.batch_size // micro) % (data * fsdp):
                        continue
                    estimate = memory.estimate_memory(
                        dataclasses.replace(cfg, remat=remat), batch_size=config.batch_size,
                        num_frames=num_frames(config.duration_sec), num_microbatches=micro,
                        full_finetuning=bool(config.full_finetuning),
                        mesh_axes={"data": data, "fsdp": fsdp, "tensor": tensor}, platform="tpu",
                        frozen_weights=placement).total
                    if estimate > ESTIMATE_EXCESS * hbm_bytes:
                        fits_whole = False if fits_whole is None else fits_whole
                        continue
                    if micro > 1 and fits_whole is not False:
                        break  # a smaller microbatch count already fits
                    found.append((Layout(data, fsdp, tensor, remat, micro, placement), estimate))
                    fits_whole = micro == 1
                    break
    return found


# ----------------------------------------------------------------------------------------------
# Fewer layers, extrapolated


def reduced(config, plain_layers: int):
    """`config` with the temporal stack cut to its TTT layers (at 1, 2, ...) and `plain_layers` others."""
    c = config.copy_and_resolve_references()
    cfg = from_run_config(config)
    ttt = len(cfg.ttt_layers)
    c.model.num_layers = ttt + plain_layers
    if ttt:
        c.ttt.layers = ",".join(str(1 + i) for i in range(ttt))
    return c


def plain_layers(config) -> int:
    cfg = from_run_config(config)
    return cfg.num_layers - len(cfg.ttt_layers)


def extrapolate(small: dict, large: dict, small_plain: int, large_plain: int, full_plain: int) -> dict:
    """Every number of `large` (a report) carried linearly in the plain-layer count to `full_plain`,
    from its difference with `small`; strings, flags and lists are `large`'s."""
    scale = (full_plain - large_plain) / (large_plain - small_plain)

    def carry(a, b):
        if isinstance(b, bool) or not isinstance(b, (int, float, dict)):
            return b
        if isinstance(b, dict):
            return {k: carry(a.get(k) if isinstance(a, dict) else None, v) for k, v in b.items()}
        if not isinstance(a, (int, float)) or isinstance(a, bool):
            return b
        value = b + (b - a) * scale
        return type(b)(value) if isinstance(b, int) else value

    return _derived(carry(small, large))


def compile_cut(config, topo, compile_fn: Callable, layers: int) -> dict:
    """`config`'s report for the full stack, extrapolated from compiles with `layers` - 1 and `layers`
    plain temporal layers (`layers` >= 3: a stack of one plain layer compiles to another program, its
    loop of one trip removed, and its memory and HBM traffic do not extrapolate; BENCHMARKS.md)."""
    if layers < 3:
        raise ValueError(f"layers={layers}: the layer cut needs at least 2 and 3 plain layers")
    small_n, large_n = layers - 1, layers
    small = compile_fn(reduced(config, small_n), topo)
    large = compile_fn(reduced(config, large_n), topo)
    report = extrapolate(small, large, small_n, large_n, plain_layers(config))
    report["extrapolated_from_plain_layers"] = [small_n, large_n]
    report["compile_s"] = small["compile_s"] + large["compile_s"]
    return report


def _derived(report: dict) -> dict:
    """Recompute what is not linear in the layers (ratios, the fit, the bound) from the carried figures."""
    m, perf, w = report.get("per_device"), report.get("performance"), report.get("weight_gathers")
    if m:
        report["fits"] = m["total_bytes"] <= report["hbm_bytes"]
        report["headroom_bytes"] = report["hbm_bytes"] - m["total_bytes"]
    if perf:  # the step's bounds are max / sum of the carried times, not linear themselves
        t, parts = perf["time_s"], perf["parts"]
        ops = sum(p["time_s"] for p in parts.values())
        perf["step_s"] = {"overlap": max(t["compute"], t["memory"], t["collectives"]),
                          "roofline": max(ops, t["collectives"]),
                          "serial": t["compute"] + t["memory"] + t["collectives"]}
        for p in parts.values():
            p["share"] = p["time_s"] / ops if ops else None
            p["mxu_efficiency"] = None  # a ratio of times the report does not carry
        perf["mxu"]["efficiency"] = None
        per_device = report["model_flops_per_step"] / report["num_devices"]
        perf["mfu"] = {k: per_device / (v * perf["peak_flops"]) if v else None for k, v in perf["step_s"].items()}
        frames = report["batch_size"] * report["num_frames"]
        perf["frames_per_s_per_chip"] = {k: frames / v / report["num_devices"] if v else None
                                         for k, v in perf["step_s"].items()}
        perf["bound"] = max((t["compute"], "compute"), (t["memory"], "memory"), (t["collectives"], "collectives"))[1]
    if w:
        w["ratio"] = w["compiled_bytes"] / w["minimum_bytes"] if w["minimum_bytes"] else None
    return report


# ----------------------------------------------------------------------------------------------
# The search


def search(config, topo, compile_fn: Callable, *, budget: int = 6, layers: int | None = None,
           log=print) -> dict:
    """Compile up to `budget` candidates for `topo` and rank them (module docstring)."""
    num_devices, hbm = topo.chips, topo.hbm_per_device(topo.chips)
    found = sorted(candidates(config, num_devices, topo.num_slices, hbm),
                   key=lambda x: (prior_seconds(config, x[0], topo.chip, num_devices), x[0].num_microbatches, x[1]))
    log(f"{len(found)} layouts pass the batch and memory checks; compiling up to {budget}")
    queue, rows = list(found), []
    while queue and len(rows) < budget:
        layout, estimate = queue.pop(0)
        c = apply(config, layout, topo.num_slices)
        log(f"  {layout.describe()} (estimate {memory.format_bytes(estimate)}, "
            f"prior {prior_seconds(config, layout, topo.chip, num_devices):.3f} s)")
        try:
            report = compile_cut(c, topo, compile_fn, layers) if layers else compile_fn(c, topo)
        except ValueError as e:  # the program refuses this layout (e.g. a mesh the model cannot split)
            rows.append({"layout": layout, "error": str(e).splitlines()[0]})
            continue
        rows.append({"layout": layout, "report": report})
        if topo.platform == "tpu" and layout.windowed_einsum and _permutes(report):
            queue.insert(0, (dataclasses.replace(layout, windowed_einsum=False), estimate))
    ranked = sorted(rows, key=_rank)
    best = next((r for r in ranked if "report" in r and r["report"]["fits"]), None)
    return {"topology": topo.name, "rows": ranked,
            "best": None if best is None else best["layout"].overrides(topo.num_slices)}


def _permutes(report: dict) -> int:
    """The compiled program's collective-permutes (XLA's windowed einsums, on TPU)."""
    return ((report.get("collectives") or {}).get("collective-permute") or {}).get("count", 0)


def _rank(row) -> tuple:
    if "report" not in row or not row["report"].get("fits"):
        return (1, math.inf)
    perf = row["report"].get("performance") or {}
    return (0, (perf.get("step_s") or {}).get("overlap", math.inf))


def format_search(result: dict) -> str:
    lines = [f"layouts for {result['topology']}, ranked by predicted step time (overlap bound; predicted, "
             f"from each compiled program):",
             f"{'#':>2} {'layout':<82} {'fits':<4} {'HBM/device':>11} {'step s':>8} {'MFU':>6} {'bound':<11} "
             f"{'weight AG / min':>15}"]
    for i, row in enumerate(result["rows"], 1):
        layout = row["layout"].describe()
        if "report" not in row:
            lines.append(f"{i:>2} {layout:<82} error: {row['error']}")
            continue
        r = row["report"]
        m = r.get("per_device") or {}
        perf = r.get("performance") or {}
        w = r.get("weight_gathers") or {}
        hbm = memory.format_bytes(m["total_bytes"]) if m else "refused"
        step = (perf.get("step_s") or {}).get("overlap")
        mfu = (perf.get("mfu") or {}).get("overlap")
        ratio = w.get("ratio")
        lines.append(f"{i:>2} {layout:<82} {'yes' if r['fits'] else 'no':<4} {hbm:>11} "
                     f"{step if step is None else f'{step:.3f}':>8} {'-' if mfu is None else f'{mfu:.1%}':>6} "
                     f"{perf.get('bound', '-'):<11} {'-' if ratio is None else f'{ratio:.2f} x':>15}")
    if result["best"]:
        lines.append("best: " + " ".join(f"--config.{k}={v}" for k, v in result["best"].items()))
    else:
        lines.append("no layout fits")
    return "\n".join(lines)


def as_json(result: dict) -> dict:
    """`search`'s result for --output_json (layouts as their overrides)."""
    return {"topology": result["topology"], "best": result["best"],
            "rows": [{**{k: v for k, v in row.items() if k != "layout"},
                      "layout": dataclasses.asdict(row["layout"])} for row in result["rows"]]}
