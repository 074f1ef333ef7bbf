"""Streaming generation speed on CPU: jit-compiled frames per second against Moshi's 12.5 frames/s.

    python bench/streaming.py [--steps 48] [--configs tiny,small,small_ttt] [--no-torch]

For each model, B=1, fp32, a KV ring of `context` = 3000 frames (attention always scans the whole
ring, so the per-frame cost does not depend on how far the stream is):
  * gen greedy / gen sampled: `streaming.gen_step` (temporal step + TTT primal step + depformer
    sampling 8 codebooks), LMGen's default sampling (temp 0.8/0.7, top-k 250/25) for "sampled";
  * teacher-forced step: `forward_chunk` with 1 frame (the streaming path of `forward --streaming`);
  * chunk 64: `forward_chunk` with 64 frames (the long-context evaluation path), frames per second;
  * gen sampled (paired), `small` and `small_ttt`: tttjax against the PyTorch package's own
    `LMGen.step` over the same config (eager; `small_ttt` with conversion/torch_ttt.py's streaming
    TTT layers attached), same sampling, 2 and 1 torch threads, timed in alternating rounds so all
    six see the same machine load.
Per-frame times are medians over `--steps` timed calls after compilation; real-time factor =
frames/s / 12.5. Configs: `tiny` = configs/tiny.py's model (dim 128, 4 layers, TTT in layers 1,3,
K 8, LoRA rank 8); `small` = dim 512, 8 layers, 8 heads, depformer 256 x 2 layers (4 heads),
card 2048, text_card 32000; `small_ttt` = small with TTT in the middle layers (2-5, K 16). Prints a
table and writes bench/results/streaming.json. Shared 2-core VMs are noisy: compare rows of one
run, and see the recorded load average.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results" / "streaming.json"
FRAME_RATE = 12.5
SMALL = dict(dim=512, num_layers=8, num_heads=8, hidden_scale=4.125, depformer_dim=256, depformer_num_layers=2,
             depformer_num_heads=4, depformer_dim_feedforward=int(256 * 4.125), card=2048, text_card=32000,
             context=3000)


def model_config(name: str):
    from tttjax.model.config import MOSHI_7B_LM_KWARGS, from_lm_kwargs

    if name == "tiny":
        from configs import tiny
        from tttjax.model.config import from_run_config

        return from_run_config(tiny.get_config())
    kwargs = dict(MOSHI_7B_LM_KWARGS, **SMALL)
    if name == "small":
        return from_lm_kwargs(kwargs)
    if name == "small_ttt":
        return from_lm_kwargs(kwargs, ttt_layers=(2, 3, 4, 5), ttt_mini_batch_size=16)
    raise ValueError(f"unknown config {name!r}: tiny, small, small_ttt")


def time_calls(fn, state, arg, steps: int):
    """Compile (first call), then time `steps` calls one by one (each waits for its result)."""
    t = time.perf_counter()
    state, out = fn(state, arg)
    jax_block(out)
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, out = fn(state, arg)
        jax_block(out)
        times.append(time.perf_counter() - t)
    return compile_s, times


def jax_block(tree):
    import jax

    jax.block_until_ready(tree)


def bench_tttjax(name: str, steps: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tttjax.model.moshi import create_model
    from tttjax.model.streaming import GREEDY, Sampling, StreamingLM

    cfg = model_config(name)
    model = create_model(cfg, seed=0)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    streamer = StreamingLM(model)
    n_user = cfg.num_codebooks - 1 - cfg.dep_q
    rows = []
    user = jnp.asarray(np.random.default_rng(0).integers(0, cfg.card, (1, n_user)), jnp.int32)
    for label, sampling in (("gen greedy", GREEDY), ("gen sampled", Sampling())):
        state = streamer.init_gen_state(1, seed=0)
        compile_s, times = time_calls(lambda s, u: streamer.step(s, u, sampling), state, user, steps)
        rows.append(dict(config=name, impl="tttjax", what=label, frames_per_call=1, compile_s=compile_s, times=times))
    codes_rng = np.random.default_rng(1)
    for label, chunk in (("teacher-forced step", 1), ("teacher-forced chunk 64", 64)):
        codes = np.concatenate([codes_rng.integers(0, cfg.text_card, (1, 1, chunk)),
                                codes_rng.integers(0, cfg.card, (1, cfg.n_q, chunk))], axis=1)
        state = streamer.init_chunk_state(1)
        n = steps if chunk == 1 else max(3, steps // 16)
        compile_s, times = time_calls(streamer.forward_chunk, state, jnp.asarray(codes, jnp.int32), n)
        rows.append(dict(config=name, impl="tttjax", what=label, frames_per_call=chunk, compile_s=compile_s,
                         times=times))
    for row in rows:
        row["params"] = int(params)
        row["ttt_layers"] = list(cfg.ttt_layers)
    return rows


def torch_model(cfg):
    """moshi's LMModel for a tttjax config, fp32, with streaming TTT layers where `cfg` has them
    (inner weights ~ N(0, 0.02) as tttjax initialises them; the cost does not depend on values)."""
    import torch
    from moshi.models import loaders

    from conversion.torch_ttt import TTTMLP, attach_ttt

    torch.manual_seed(0)
    lm = loaders.get_moshi_lm(None, lm_kwargs=cfg.raw_lm_kwargs(), device="cpu", dtype=torch.float32)
    attach_ttt(lm, cfg.ttt_dict())
    with torch.no_grad():
        for m in lm.modules():
            if isinstance(m, TTTMLP):
                m.W1.normal_(0, 0.02)
                m.W2.normal_(0, 0.02)
    return lm.eval()


def paired_vs_torch(steps: int, rounds: int = 8) -> list[dict]:
    """tttjax gen_step against moshi's LMGen.step on `small` and `small_ttt`, same sampling (LMGen's
    defaults), timed in alternating rounds so that all see the same machine load; torch with 2 and
    with 1 threads (oversubscribed OpenMP threads can be much slower on a loaded VM)."""
    import contextlib

    import jax
    import jax.numpy as jnp
    import torch
    from moshi.models.lm import LMGen

    from tttjax.model.moshi import create_model
    from tttjax.model.streaming import Sampling, StreamingLM

    user_np = np.random.default_rng(0).integers(0, 2048, (1, 8))
    impls, params, ttt_layers = {}, {}, {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        for name in ("small", "small_ttt"):
            cfg = model_config(name)
            streamer = StreamingLM(create_model(cfg, seed=0))
            state = [streamer.init_gen_state(1, seed=0)]
            user = jnp.asarray(user_np, jnp.int32)

            def jax_step(streamer=streamer, state=state, user=user):
                state[0], out = streamer.step(state[0], user, Sampling())
                jax.block_until_ready(out)

            impls[name, "tttjax"] = (jax_step, None)
            lm = torch_model(cfg)
            params[name], ttt_layers[name] = sum(p.numel() for p in lm.parameters()), list(cfg.ttt_layers)
            gen = LMGen(lm)  # LMGen's default sampling; one stream, stepped with 2 or 1 threads
            stack.enter_context(gen.streaming(1))
            for threads in (2, 1):
                impls[name, f"torch LMGen (eager, {threads} thr)"] = (
                    functools.partial(gen.step, torch.from_numpy(user_np[:, :, None])), threads)
        times = {key: [] for key in impls}
        compile_s = {}
        for key, (fn, threads) in impls.items():
            if threads:
                torch.set_num_threads(threads)
            t = time.perf_counter()
            fn()
            compile_s[key] = time.perf_counter() - t
        per_round = max(1, steps // rounds)
        for _ in range(rounds):
            for key, (fn, threads) in impls.items():
                if threads:
                    torch.set_num_threads(threads)
                for _ in range(per_round):
                    t = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - t)
    return [dict(config=name, impl=impl, what="gen sampled (paired)", frames_per_call=1,
                 compile_s=compile_s[name, impl], times=times[name, impl], params=params[name],
                 ttt_layers=ttt_layers[name]) for name, impl in impls]


def summarise(row: dict) -> dict:
    med = statistics.median(row["times"])
    fps = row["frames_per_call"] / med
    row.update(median_ms=1000 * med, p90_ms=1000 * float(np.percentile(row["times"], 90)), frames_per_s=fps,
               real_time_factor=fps / FRAME_RATE)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=48, help="timed calls per row (after the compiling one)")
    parser.add_argument("--configs", default="tiny,small,small_ttt")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch LMGen rows")
    args = parser.parse_args()

    import jax

    rows = []
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    for name in args.configs.split(","):
        rows += [summarise(r) for r in bench_tttjax(name, args.steps)]
    if not args.no_torch:
        rows += [summarise(r) for r in paired_vs_torch(args.steps)]
    header = f"{'config':10} {'impl':28} {'what':24} {'ms/call':>9} {'p90 ms':>8} {'frames/s':>9} {'x real time':>11} {'compile s':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['config']:10} {r['impl']:28} {r['what']:24} {r['median_ms']:9.2f} {r['p90_ms']:8.2f} "
              f"{r['frames_per_s']:9.1f} {r['real_time_factor']:11.2f} {r['compile_s']:9.1f}")
    meta = dict(cpus=os.cpu_count(), machine=platform.machine(), jax=jax.__version__, backend=jax.default_backend(),
                batch=1, dtype="float32", context=3000, steps=args.steps, frame_rate=FRAME_RATE,
                loadavg_before=load_before, loadavg_after=os.getloadavg(), wall_s=time.perf_counter() - t0)
    try:
        import torch

        meta["torch"] = torch.__version__
    except ImportError:
        pass
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"wrote {RESULTS} ({meta['wall_s']:.0f} s, load average {load_before[0]:.1f} -> {meta['loadavg_after'][0]:.1f})")


if __name__ == "__main__":
    main()
