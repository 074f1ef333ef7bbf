"""Train-step throughput: tttjax vs the PyTorch `moshi` LMModel at the same config, same run.

    python bench/train_step.py [--configs small,tiny] [--steps 8] [--repeats 2] [--threads 2]

Each measurement (the matmul rate, each JAX variant, PyTorch) runs in its own process and reports
its fastest step (other jobs on a shared machine only ever slow a step down); the variants run
--repeats times, interleaved, and each keeps its fastest run, so a slow spell of the machine does
not land on one variant only. JAX runs
with unroll_layers=True; "jax scan" is the same step with the layers in a lax.scan loop. Every JAX
process runs malloc on huge pages as the train launcher does (tttjax/host_malloc.py;
TTTJAX_HUGE_PAGES=0 measures glibc's defaults); PyTorch runs twice: as moshi-finetune runs it
(glibc's defaults) and with malloc on huge pages as JAX ("torch huge").

Full fine-tuning, fp32, AdamW, moshi-finetune's loss, B=2, T=128. Prints a table of frames/s
(JAX, JAX with TTT at one layer, PyTorch eager, both), their ratios, and MFU = analytic model FLOPs
per step / the fp32 matmul rate measured in the same run (a 2048^3 jnp matmul). Writes
bench/results/train_step.json.

FLOP count (per frame, forward; a train step counts 3x; tttjax/analysis/flops.py): every matmul 2*in*out
(temporal in/out projections, SiLU-GLU, text head; depformer_in, 8 slots of the depformer layers
and heads), attention 4*D*(mean causal context) per layer; a TTT layer adds its 4 D x D
projections and the inner loop H*(14*d*4d + 6*K*d + 6*K*4d) (ttt-reference.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flops import matmul_rate  # noqa: E402

from tttjax.analysis.flops import forward_flops_per_frame  # noqa: E402
from tttjax.model.config import from_lm_kwargs  # noqa: E402

SMALL = dict(dim=512, num_layers=8, num_heads=8, hidden_scale=4.125, depformer_dim=256, depformer_num_layers=2,
             depformer_num_heads=4, depformer_dim_feedforward=int(4.125 * 256), card=2048, text_card=32000,
             context=3000)
TINY = dict(dim=128, num_layers=4, num_heads=4, hidden_scale=4.125, depformer_dim=64, depformer_num_layers=2,
            depformer_num_heads=4, depformer_dim_feedforward=264, card=64, text_card=96, context=3000)
CONFIGS = {"small": SMALL, "tiny": TINY}
BATCH, FRAMES = 2, 128


def lm_kwargs(changes):
    from tttjax.model.config import MOSHI_7B_LM_KWARGS

    return dict(MOSHI_7B_LM_KWARGS, **changes)


def jax_trainer(kwargs, ttt_layers: str, unroll: bool):
    """The full fine-tuning Trainer at `kwargs` (TTT at `ttt_layers`) and one B x T batch for it."""
    import ml_collections
    import numpy as np

    from configs import base
    from tttjax.train.loop import Trainer

    c = base.get_config()
    c.run_dir = "/tmp/tttjax-bench-unused"
    c.do_ckpt = False
    c.max_steps = 1000
    c.batch_size = BATCH
    c.duration_sec = FRAMES / 12.5
    c.model = ml_collections.ConfigDict(kwargs)
    c.param_dtype = c.dtype = "float32"
    c.remat = "none"
    c.unroll_layers = unroll
    c.full_finetuning = True
    c.lora.enable = False
    c.ttt.enable = bool(ttt_layers)
    c.ttt.layers = ttt_layers or "none"
    trainer = Trainer(c)
    rng = np.random.default_rng(0)
    codes = np.concatenate([rng.integers(0, kwargs["text_card"], (BATCH, 1, FRAMES)),
                            rng.integers(0, kwargs["card"], (BATCH, 16, FRAMES))], axis=1).astype(np.int32)
    return trainer, trainer._global_batch(codes)


def jax_step_time(kwargs, ttt_layers: str, steps: int, unroll: bool = True) -> float:
    import jax

    trainer, batch = jax_trainer(kwargs, ttt_layers, unroll)
    state = trainer.state
    for _ in range(2):
        state, metrics = trainer.step_fn(state, trainer.frozen, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = trainer.step_fn(state, trainer.frozen, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    return min(times)


def torch_step_time(kwargs, steps: int, threads: int) -> float:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from moshi.models import loaders

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    lm = loaders.get_moshi_lm(None, lm_kwargs=kwargs, device="cpu", dtype=torch.float32).train()
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    codes = torch.from_numpy(np.concatenate([rng.integers(0, kwargs["text_card"], (BATCH, 1, FRAMES)),
                                             rng.integers(0, kwargs["card"], (BATCH, 16, FRAMES))], axis=1))

    def ce(logits, target, mask):
        logits = torch.where(mask[..., None], logits, torch.zeros_like(logits))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.where(mask, target, 0).reshape(-1),
                               reduction="none")
        return (loss * mask.reshape(-1)).sum() / mask.sum()

    def step():
        opt.zero_grad()
        out = lm(codes)
        loss = ce(out.text_logits, codes[:, :1], out.text_mask) + ce(out.logits, codes[:, 1:9], out.mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return min(times)


def worker(what: str, config: str, steps: int, threads: int) -> None:
    """One measurement in this (fresh) process, printed as a RESULT line."""
    if what != "torch":
        from tttjax.host_malloc import reexec_with_huge_pages

        reexec_with_huge_pages()  # as tttjax.main does
    load = os.getloadavg()[0]
    if what == "matmul":
        result = {"flops_per_s": matmul_rate(2048)}
    else:
        kwargs = lm_kwargs(CONFIGS[config])
        seconds = {"jax": lambda: jax_step_time(kwargs, "", steps),
                   "jax_scan": lambda: jax_step_time(kwargs, "", steps, unroll=False),
                   "jax_ttt": lambda: jax_step_time(kwargs, "1", steps),
                   # the same step; only the malloc the process was (re-)started with differs
                   "torch": lambda: torch_step_time(kwargs, steps, threads)}[what.removesuffix("_huge")]()
        result = {"step_s": seconds}
    result.update(load_before=load, load_after=os.getloadavg()[0])
    print("RESULT " + json.dumps(result), flush=True)


def measure(what: str, config: str, steps: int, threads: int) -> dict:
    """Runs `worker` in its own process: XLA's and torch's thread pools never share one process."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, __file__, "--worker", what, config, str(steps), str(threads)],
                          capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{what} {config} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="small,tiny")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jax_only", action="store_true",
                        help="skip PyTorch (on an accelerator machine: bench/device_suite.sh)")
    parser.add_argument("--worker", nargs=4, metavar=("WHAT", "CONFIG", "STEPS", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        what, config, steps, threads = args.worker
        worker(what, config, int(steps), int(threads))
        return
    variants = ("jax", "jax_scan", "jax_ttt") + (() if args.jax_only else ("torch", "torch_huge"))
    names = args.configs.split(",")
    runs = {name: {} for name in names}
    peak = 0.0  # the fastest matmul of the run: a slow spell never inflates MFU
    for _ in range(args.repeats):
        peak = max(peak, measure("matmul", "-", 0, args.threads)["flops_per_s"])
        for name in names:
            for what in variants:
                run = measure(what, name, args.steps, args.threads)
                if what not in runs[name] or run["step_s"] < runs[name][what]["step_s"]:
                    runs[name][what] = run
    rows = []
    for name in names:
        kwargs = lm_kwargs(CONFIGS[name])
        frames = BATCH * FRAMES
        t_jax, t_scan, t_ttt = (runs[name][w]["step_s"] for w in variants[:3])
        plain, one_ttt = from_lm_kwargs(kwargs), from_lm_kwargs(kwargs, ttt_layers=(1,))
        flops = 3 * frames * forward_flops_per_frame(plain, FRAMES)
        flops_ttt = 3 * frames * forward_flops_per_frame(one_ttt, FRAMES)
        row = {"config": name, "jax_frames_per_s": frames / t_jax, "jax_scan_frames_per_s": frames / t_scan,
               "jax_ttt_frames_per_s": frames / t_ttt, "ttt_slowdown": 1 - t_jax / t_ttt,
               "jax_mfu": flops / t_jax / peak, "jax_ttt_mfu": flops_ttt / t_ttt / peak, "gflop_per_step": flops / 1e9,
               "load": {w: r["load_before"] for w, r in runs[name].items()}}
        if not args.jax_only:
            t_torch, t_torch_huge = runs[name]["torch"]["step_s"], runs[name]["torch_huge"]["step_s"]
            row.update({"torch_frames_per_s": frames / t_torch, "jax_over_torch": t_torch / t_jax,
                        "torch_huge_frames_per_s": frames / t_torch_huge, "jax_over_torch_huge": t_torch_huge / t_jax,
                        "torch_mfu": flops / t_torch / peak})
        rows.append(row)
    print(f"fp32 matmul rate (2048^3, jnp): {peak / 1e9:.0f} GFLOP/s; B={BATCH}, T={FRAMES}, full fine-tuning")
    columns = [("jax f/s", "jax_frames_per_s", ".0f"), ("jax scan f/s", "jax_scan_frames_per_s", ".0f"),
               ("jax+ttt f/s", "jax_ttt_frames_per_s", ".0f"), ("torch f/s", "torch_frames_per_s", ".0f"),
               ("jax/torch", "jax_over_torch", ".2f"), ("torch huge f/s", "torch_huge_frames_per_s", ".0f"),
               ("jax/torch huge", "jax_over_torch_huge", ".2f"), ("ttt cost", "ttt_slowdown", ".1%"),
               ("jax MFU", "jax_mfu", ".1%"), ("torch MFU", "torch_mfu", ".1%")]
    print(f"{'config':8} " + " ".join(f"{title:>{len(title) + 1}}" for title, _, _ in columns))
    for r in rows:
        print(f"{r['config']:8} " + " ".join(f"{format(r[key], fmt) if key in r else '-':>{len(title) + 1}}"
                                            for title, key, fmt in columns))
    out = Path(__file__).parent / "results" / "train_step.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"matmul_flops_per_s": peak, "batch": BATCH, "frames": FRAMES, "repeats": args.repeats,
                               "cpus": os.cpu_count(), "rows": rows,
                               "huge_pages": os.environ.get("TTTJAX_HUGE_PAGES") != "0"}, indent=2))


if __name__ == "__main__":
    main()
