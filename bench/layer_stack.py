"""The 7B-shaped temporal layer stack with a TTT layer: forward + backward throughput and MFU.

    python bench/layer_stack.py                  # on a GPU: 4 layers of the 7B shape, bf16
    python bench/layer_stack.py --quick          # CPU-sized shapes: checks the script end to end

Builds MoshiLM's temporal transformer at the moshi 7B shape (dim 4096, 32 heads, SiLU-GLU hidden
11264, context 3000) cut to --layers layers, with a TTT-MLP (32 heads, 16-token mini-batches, scan
remat group 4, as configs/moshi_7b_ttt.py) at --ttt-layer, and times the gradient of mean(y^2)
with respect to every parameter of the stack and its input (jit, fastest of --steps), with and
without the TTT layer. MFU = analytic FLOPs (tttjax/analysis/flops.py, 3x the forward) / the matmul rate of
the same dtype measured in the same run (an n^3 jnp matmul, n = 8192 on an accelerator, 2048 on
CPU). Writes bench/results/layer_stack.json with the device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flops import matmul_rate  # noqa: E402

from tttjax.analysis.flops import layer_flops, ttt_flops  # noqa: E402
from tttjax.model.config import REMAT_MODES  # noqa: E402

QUICK = dict(dim=256, num_heads=4)  # --quick: the same stack, narrow enough for a 2-core CPU


def stack_config(layers: int, ttt_layer: int | None, dtype: str, remat: str, quick: bool):
    from tttjax.model.config import MOSHI_7B_LM_KWARGS, from_lm_kwargs

    # Only the temporal stack runs: small vocabularies and one depformer layer keep the unused rest cheap.
    kwargs = dict(MOSHI_7B_LM_KWARGS, num_layers=layers, text_card=32, card=32, depformer_num_layers=1,
                  **(QUICK if quick else {}))
    ttt = dict(ttt_layers=(ttt_layer,), ttt_mini_batch_size=16, ttt_scan_remat_group=4) if ttt_layer is not None else {}
    return from_lm_kwargs(kwargs, param_dtype=dtype, dtype=dtype, remat=remat, unroll_layers=True, **ttt)


def stack_step_time(cfg, batch: int, frames: int, steps: int) -> float:
    """Fastest jitted grad of mean(temporal(x)^2) w.r.t. the stack's params and x."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tttjax.model.moshi import create_model

    model = create_model(cfg)
    in_stack = lambda path, _: path[0] in ("transformer", "ttt", "out_norm")  # noqa: E731
    graphdef, params, rest = nnx.split(model, in_stack, ...)

    def loss(params, x):
        y = nnx.merge(graphdef, params, rest).temporal(x)
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    x = jax.random.normal(jax.random.key(1), (batch, frames, cfg.dim), jnp.float32).astype(cfg.jnp_dtype)
    jax.block_until_ready(grad(params, x))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(grad(params, x))
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ttt-layer", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=2048)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on an accelerator, float32 on CPU")
    parser.add_argument("--remat", default="none", choices=REMAT_MODES)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="CPU-sized: dim 256, 4 heads, 256 frames")
    args = parser.parse_args()
    from tttjax.host_malloc import reexec_with_huge_pages

    reexec_with_huge_pages()  # as tttjax.main does
    import jax

    from tttjax.model.config import ffn_hidden

    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    frames = 256 if args.quick else args.frames
    matmul_n = 2048 if on_cpu else 8192
    peak = matmul_rate(matmul_n, dtype)
    plain_cfg = stack_config(args.layers, None, dtype, args.remat, args.quick)
    ttt_cfg = stack_config(args.layers, args.ttt_layer, dtype, args.remat, args.quick)
    D = plain_cfg.dim
    per_token = args.layers * layer_flops(D, ffn_hidden(D, int(plain_cfg.hidden_scale * D)), frames, plain_cfg.context)
    tokens = args.batch * frames
    rows = []
    for name, cfg, flops in (("stack", plain_cfg, per_token), ("stack + TTT", ttt_cfg,
                                                                per_token + ttt_flops(D, ttt_cfg.ttt_heads))):
        seconds = stack_step_time(cfg, args.batch, frames, args.steps)
        rows.append({"what": name, "step_s": seconds, "tokens_per_s": tokens / seconds,
                     "tflop_per_step": 3 * tokens * flops / 1e12})
    peak = max(peak, matmul_rate(matmul_n, dtype))  # the faster of before and after: a slow spell never inflates MFU
    for r in rows:
        r["mfu"] = r["tflop_per_step"] * 1e12 / r["step_s"] / peak
    print(f"{device.device_kind} ({device.platform}), {dtype}, dim {D}, {args.layers} layers, "
          f"B={args.batch}, T={frames}, remat {args.remat}; matmul rate {peak / 1e12:.2f} TFLOP/s")
    print(f"{'':12} {'step s':>8} {'tokens/s':>10} {'TFLOP/step':>11} {'MFU':>7}")
    for r in rows:
        print(f"{r['what']:12} {r['step_s']:8.3f} {r['tokens_per_s']:10.0f} {r['tflop_per_step']:11.3f} {r['mfu']:7.1%}")
    print(f"TTT cost: {1 - rows[0]['step_s'] / rows[1]['step_s']:.1%}")
    out = Path(__file__).parent / "results" / "layer_stack.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"device": device.device_kind, "platform": device.platform, "dtype": dtype,
                               "dim": D, "layers": args.layers, "batch": args.batch, "frames": frames,
                               "remat": args.remat, "matmul_flops_per_s": peak, "rows": rows,
                               "load": os.getloadavg()[0]}, indent=2))


if __name__ == "__main__":
    main()
