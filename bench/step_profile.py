"""Where a train step's time goes: an XLA profile of the small (or tiny) config's step.

    python bench/step_profile.py [--config small] [--steps 3] [--ttt 1]

Runs the same full fine-tuning step as bench/train_step.py (JAX, fp32, B=2, T=128, unrolled
layers; --ttt puts TTT-MLP branches at those layers) under jax.profiler and sums the time of every
XLA op by phase and kind: phase from the op's HLO metadata (forward under `jvp`, backward under
`transpose`, the rest is the optimizer: clipping and AdamW), kind from the op (matmul: Eigen dots
and YNNPACK dot fusions; copy: slices, concatenations, transposes, pads; fill: broadcast constants,
e.g. zeroed embedding gradients; elementwise: every other fusion, reductions included). Op time is
summed over the threads running ops, so it can exceed the step's wall time; "concurrency" is the
share of the step with 0, 1 and 2+ ops running.
Also reports minor page faults and kernel time per step (TTTJAX_HUGE_PAGES=0 shows glibc's
defaults), and the floor the matmul kernels set: every dot of the compiled step timed alone at its
shape, summed, against a 2048^3 matmul. Writes bench/results/step_profile.json.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flops import matmul_rate  # noqa: E402
from train_step import CONFIGS, jax_trainer, lm_kwargs  # noqa: E402

_INFRA = ("ThunkExecutor", "$", "Slinky", "Pjit", "PjRt", "Execute")  # runtime spans, not ops
_COPY = ("slice", "concatenate", "copy", "transpose", "pad")


def op_metadata(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its op_name metadata (the JAX primitive path) in compiled HLO text."""
    return {m.group(1): m.group(2)
            for m in re.finditer(r"%([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", hlo_text)}


def classify(name: str, op_name: str) -> tuple[str, str]:
    phase = "backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name else "optimizer"
    base = re.sub(r"[.]\d+$", "", name)
    if base == "dot" or base == "ynn_fusion" and op_name.endswith("dot_general"):
        kind = "matmul"
    elif base.startswith("wrapped_broadcast"):
        kind = "fill"
    elif any(word in base for word in _COPY):
        kind = "copy"
    else:
        kind = "elementwise"
    return phase, kind


def profile_ops(run_step, steps: int) -> tuple[list[tuple[float, float, str]], float]:
    """(start, end, name) of every XLA op over `steps` profiled steps, and their wall time."""
    import jax

    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        start = time.perf_counter()
        for _ in range(steps):
            run_step()
        wall = time.perf_counter() - start
        jax.profiler.stop_trace()
        (trace_file,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        trace = json.load(gzip.open(trace_file))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ops = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
           if e.get("ph") == "X" and "dur" in e and not e["name"].startswith(_INFRA) and "Thunk" not in e["name"]]
    return ops, wall


def isolated_dots(hlo_text: str) -> tuple[float, float]:
    """(seconds, FLOPs) of every f32 dot in the compiled step, each shape timed alone (fastest of 5)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    shapes = {m.group(1): tuple(int(d) for d in m.group(2).split(",") if d)
              for m in re.finditer(r"%([\w.\-]+) = f32\[([\d,]*)\]", hlo_text)}

    def dims(rest: str, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in re.search(key + r"=\{([\d,]*)\}", rest).group(1).split(",") if d)

    counts = collections.Counter()
    for m in re.finditer(r"= f32\[[\d,]*\]\{[\d,]*\} dot\(%([\w.\-]+), %([\w.\-]+)\)([^\n]*)", hlo_text):
        rest = m.group(3)
        batch = (dims(rest, "lhs_batch_dims"), dims(rest, "rhs_batch_dims")) if "lhs_batch_dims" in rest else ((), ())
        counts[(shapes[m.group(1)], shapes[m.group(2)], (dims(rest, "lhs_contracting_dims"),
                                                          dims(rest, "rhs_contracting_dims")), batch)] += 1
    seconds = flops = 0.0
    for (lhs, rhs, contracting, batch), count in counts.items():
        dot = jax.jit(lambda a, b, c=contracting, bd=batch: jax.lax.dot_general(a, b, (c, bd)))
        a, b = jnp.ones(lhs, jnp.float32), jnp.ones(rhs, jnp.float32)
        out = jax.block_until_ready(dot(a, b))
        times = []
        for _ in range(5):
            start = time.perf_counter()
            jax.block_until_ready(dot(a, b))
            times.append(time.perf_counter() - start)
        seconds += count * min(times)
        flops += count * 2 * out.size * int(np.prod([lhs[d] for d in contracting[0]]))
    return seconds, flops


def concurrency(ops) -> dict[str, float]:
    """Share of the traced span with 0, 1 and 2+ ops running."""
    edges = sorted([(s, 1) for s, _, _ in ops] + [(t, -1) for _, t, _ in ops])
    spans = collections.Counter()
    running, last = 0, edges[0][0]
    for t, delta in edges:
        spans[min(running, 2)] += t - last
        last, running = t, running + delta
    total = sum(spans.values())
    return {"0": spans[0] / total, "1": spans[1] / total, "2+": spans[2] / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ttt", default="", help="TTT layers, e.g. 1 (default: none)")
    args = parser.parse_args()
    from tttjax.host_malloc import TUNABLE, reexec_with_huge_pages

    reexec_with_huge_pages()  # as tttjax.main does
    huge = TUNABLE in os.environ.get("GLIBC_TUNABLES", "")
    import jax

    trainer, batch = jax_trainer(lm_kwargs(CONFIGS[args.config]), args.ttt, unroll=True)
    state = trainer.state

    def run_step():
        nonlocal state
        state, metrics = trainer.step_fn(state, trainer.frozen, batch)
        jax.block_until_ready(metrics)

    for _ in range(4):  # compile, warm up
        run_step()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(args.steps):
        run_step()
    after, wall = resource.getrusage(resource.RUSAGE_SELF), (time.perf_counter() - start) / args.steps
    faults = (after.ru_minflt - before.ru_minflt) / args.steps
    kernel_s = (after.ru_stime - before.ru_stime) / args.steps

    compiled = trainer.step_fn.__wrapped__  # the jitted step inside the mesh wrapper
    with jax.set_mesh(trainer.mesh):
        hlo_text = compiled.lower(state, trainer.frozen, batch).compile().as_text()
    metadata = op_metadata(hlo_text)
    ops, traced_wall = profile_ops(run_step, args.steps)
    table = collections.Counter()
    for s, t, name in ops:
        table[classify(name, metadata.get(name, ""))] += (t - s) / 1e6 / args.steps  # us -> s per step
    op_total = sum(table.values())
    shares = concurrency(ops)
    matmul_peak = matmul_rate(2048)
    dot_s, dot_flops = isolated_dots(hlo_text)
    matmul_peak = max(matmul_peak, matmul_rate(2048))  # the faster probe: a slow spell never flatters the dots

    print(f"{args.config}: step {wall:.3f} s (profiled {traced_wall / args.steps:.3f} s), op time {op_total:.3f} s "
          f"summed over threads; {faults:.0f} page faults and {kernel_s:.2f} s kernel time per step "
          f"(malloc on huge pages: {huge})")
    print(f"concurrency: no op {shares['0']:.0%}, one op {shares['1']:.0%}, two or more {shares['2+']:.0%}")
    print(f"the step's dots timed alone: {dot_s:.3f} s for {dot_flops / 1e9:.1f} GFLOP = {dot_flops / dot_s / 1e9:.0f} "
          f"GFLOP/s, {dot_flops / dot_s / matmul_peak:.0%} of the 2048^3 matmul rate "
          f"({matmul_peak / 1e9:.0f} GFLOP/s); "
          f"the step takes {wall / dot_s:.2f}x their time")
    print(f"{'phase':10} {'kind':12} {'ms/step':>8} {'share':>6}")
    for (phase, kind), seconds in sorted(table.items(), key=lambda kv: -kv[1]):
        print(f"{phase:10} {kind:12} {seconds * 1e3:8.1f} {seconds / op_total:6.1%}")
    out = Path(__file__).parent / "results" / "step_profile.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "config": args.config, "step_s": wall, "op_s": op_total, "page_faults_per_step": faults,
        "kernel_s_per_step": kernel_s, "malloc_huge_pages": huge, "concurrency": shares,
        "isolated_dots_s": dot_s, "dot_flops": dot_flops, "matmul_flops_per_s": matmul_peak,
        "ops": [{"phase": p, "kind": k, "s_per_step": v} for (p, k), v in sorted(table.items())],
        "cpus": os.cpu_count(), "load": os.getloadavg()[0]}, indent=2))


if __name__ == "__main__":
    main()
