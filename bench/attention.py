"""Whole-sequence attention: blockwise vs xla (full scores) on this machine, side by side.

    python bench/attention.py [--frames 1024,4096,16384] [--context 3000] [--heads 2] [--head_dim 128]
                              [--repeats 3] [--impls xla,blockwise[,blockwise_autodiff,splash,cudnn]]

One training use of a temporal attention layer: forward and gradient with respect to q, k, v,
bf16 inputs, Moshi's window (`context` = 3000 frames), B = 1. For each T and implementation:
the fastest of --repeats timed calls after a warm-up (other jobs only ever slow a call down), and
the compiler's peak temporary memory (`memory_analysis`). Both implementations run in this one
process, interleaved per T, so their ratio is what to read on a shared machine. Memory is per
head-pair here; the 7B layer has 32 heads (x16). Writes bench/results/attention.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tttjax.analysis.memory import format_bytes  # noqa: E402
from tttjax.model import attention  # noqa: E402

IMPLS = {
    "xla": attention.full_attention,
    "blockwise": attention.blockwise_attention,
    "splash": attention.splash_attention,
    "cudnn": attention.cudnn_attention,  # GPU only
    # the same forward differentiated by JAX through its scan (no custom VJP): what the VJP saves
    "blockwise_autodiff": lambda q, k, v, c: attention._blockwise_forward(q, k, v, c, attention.BLOCK_FRAMES)[0],
}


def training_call(attend, context):
    def loss(q, k, v):
        return attend(q, k, v, context).astype(jnp.float32).sum()

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def measure(impl: str, frames: int, args) -> dict:
    shape = (1, frames, args.heads, args.head_dim)
    q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in jax.random.split(jax.random.key(0), 3))
    fn = training_call(IMPLS[impl], args.context)
    compiled = fn.lower(q, k, v).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(q, k, v))
    best = float("inf")
    for _ in range(args.repeats):
        tic = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        best = min(best, time.perf_counter() - tic)
    return {"impl": impl, "frames": frames, "seconds": best, "temp_bytes": int(temp)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", default="1024,4096,16384")
    p.add_argument("--context", type=int, default=3000)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--impls", default="xla,blockwise")
    args = p.parse_args()
    impls = args.impls.split(",")
    rows = []
    print(f"{jax.devices()[0].device_kind}, B=1, H={args.heads}, d={args.head_dim}, context={args.context}, "
          f"bf16, forward + gradient")
    print(f"{'T':>7} " + " ".join(f"{name + ' s':>13} {name + ' temp':>15}" for name in impls) + "   time ratio   memory ratio")
    for frames in (int(t) for t in args.frames.split(",")):
        row = {impl: measure(impl, frames, args) for impl in impls}
        rows += row.values()
        first, last = row[impls[0]], row[impls[-1]]
        print(f"{frames:>7} " + " ".join(f"{row[i]['seconds']:>13.3f} {format_bytes(row[i]['temp_bytes']):>15}"
                                          for i in impls)
              + f"   {first['seconds'] / last['seconds']:>10.2f}   {first['temp_bytes'] / max(last['temp_bytes'], 1):>12.1f}",
              flush=True)
    out = Path(__file__).resolve().parent / "results" / "attention.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"device": jax.devices()[0].device_kind, "args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
