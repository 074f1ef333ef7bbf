"""The performance model (tttjax/analysis/perf.py) checked where it can be measured: predicted vs
measured train-step time on this machine.

    python bench/perf_model.py [--configs tiny,bench_tiny,bench_small] [--steps 6]

The machine is measured the way the model describes a chip: its matmul rate (a jitted 2048^3
matmul in the step's dtype, fastest of 5) and its memory bandwidth (a jitted y = 2x + 1 over 256 MiB,
read + write, fastest of 5). Each config's Trainer compiles its step; the model reads that program's
optimized HLO and predicts its time with those two rates (no matrix-unit tile on a CPU: every dot at
the measured rate; on a GPU the chips.py entry for the device as well); then the Trainer's step is
timed (fastest of --steps). Prints predicted (all overlapped / op by op / nothing overlapped) and
measured seconds and their ratio; writes bench/results/perf_model.json.

Configs: `tiny` is configs/tiny.py as the trainer runs it (LoRA + TTT, B=8 x 50 frames, fp32);
`bench_tiny` / `bench_small` are bench/train_step.py's (full fine-tuning, B=2 x 128, fp32). The
process runs malloc on huge pages as `python -m tttjax.main` does (tttjax/host_malloc.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flops import matmul_rate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def memory_bandwidth(mib: int = 256) -> float:
    """Bytes/s of a jitted streaming x <- 2x + 1 in place (donated: reads and writes `mib` MiB, no
    fresh allocation to fault in; fastest of 5)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib * 2 ** 20 // 4,), jnp.float32)
    nbytes = x.nbytes
    f = jax.jit(lambda v: v * 0.5 + 1.0, donate_argnums=0)
    x = f(f(x)).block_until_ready()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        x = f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * nbytes / min(times)


def host_chip(flops: float, bandwidth: float):
    """This machine as perf.py's chip: the measured rates, no tile padding, no interconnect."""
    from tttjax.analysis import chips

    return chips.Chip("measured host", flops, 0, bandwidth, 1.0, 1, 1.0, 1, (1, 1, 1), 0,
                      f"measured by bench/perf_model.py: {flops / 1e9:.0f} GFLOP/s, {bandwidth / 1e9:.1f} GB/s")


def table_chip(device_kind: str):
    """The chips.py entry for a GPU (its datasheet figures), if there is one."""
    from tttjax.analysis import chips

    kind = device_kind.lower()
    return next((c for name, c in chips.CHIPS.items() if name in kind), None)


def tiny_trainer(run_dir: str):
    """configs/tiny.py's Trainer (no checkpoints) and one batch of random codes for it."""
    import numpy as np

    from configs import tiny
    from tttjax.train.loop import Trainer

    c = tiny.get_config()
    c.run_dir, c.do_ckpt, c.eval_freq = run_dir, False, 0
    trainer = Trainer(c)
    T = trainer.num_frames
    rng = np.random.default_rng(0)
    codes = np.concatenate([rng.integers(0, trainer.cfg.text_card, (c.batch_size, 1, T)),
                            rng.integers(0, trainer.cfg.card, (c.batch_size, 16, T))], axis=1).astype(np.int32)
    return trainer, trainer._global_batch(codes)


def make_trainer(name: str, run_dir: str):
    if name == "tiny":
        return tiny_trainer(run_dir)
    import train_step

    return train_step.jax_trainer(train_step.lm_kwargs(train_step.CONFIGS[name.removeprefix("bench_")]), "",
                                  unroll=True)


def measure_config(name: str, steps: int, rounds: int, dtype: str, table) -> dict:
    """Compile the config's Trainer step, then `rounds` alternating rounds of (matmul rate, memory
    bandwidth, `steps` steps): each keeps its best, so a slow spell of the shared machine lands on
    all three alike. The prediction uses the best rates of those rounds."""
    import jax

    from tttjax.analysis import perf
    from tttjax.analysis.flops import train_step_flops

    with tempfile.TemporaryDirectory() as run_dir:
        trainer, batch = make_trainer(name, run_dir)
        config = trainer.config
        text = trainer.program.compile().as_text()  # the step the trainer then runs
        frames = trainer.num_frames
        model_flops = train_step_flops(trainer.cfg, config.batch_size, frames, full_finetuning=trainer.full)
        state = trainer.state
        for _ in range(2):
            state, metrics = trainer.step_fn(state, trainer.frozen, batch)
        jax.block_until_ready((state, metrics))
        times, flops, bandwidth = [], 0.0, 0.0
        for _ in range(rounds):
            flops, bandwidth = max(flops, matmul_rate(2048, dtype)), max(bandwidth, memory_bandwidth())
            for _ in range(steps):
                tic = time.perf_counter()
                state, metrics = trainer.step_fn(state, trainer.frozen, batch)
                jax.block_until_ready((state, metrics))
                times.append(time.perf_counter() - tic)
        trainer_lock_release(trainer)
    chip_list = [host_chip(flops, bandwidth)] + ([table] if table is not None else [])
    predicted = {chip.name: perf.predict(text, trainer.mesh, chip, model_flops=model_flops,
                                         frames_per_step=config.batch_size * frames) for chip in chip_list}
    return {"config": name, "batch": int(config.batch_size), "frames": frames, "model_flops": model_flops,
            "matmul_flops": flops, "memory_bandwidth": bandwidth,
            "measured_s": min(times), "measured_median_s": sorted(times)[len(times) // 2],
            "predicted": {k: {"step_s": p["step_s"], "time_s": p["time_s"], "bound": p["bound"],
                              "op_executions": p["op_executions"], "parts": {n: v["share"] for n, v in p["parts"].items()},
                              "flops_per_device": p["flops_per_device"]}
                          for k, p in predicted.items()}}


def trainer_lock_release(trainer) -> None:
    from tttjax.checkpoint import lock

    lock.release(trainer.run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,bench_tiny,bench_small")
    parser.add_argument("--steps", type=int, default=4, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of rates and steps")
    args = parser.parse_args()
    import os

    from tttjax.host_malloc import reexec_with_huge_pages

    reexec_with_huge_pages()  # malloc on huge pages, as the trainer's launcher runs it
    import jax

    device = jax.devices()[0]
    dtype = "bfloat16" if device.platform == "gpu" else "float32"
    rows = []
    for name in args.configs.split(","):
        row = measure_config(name, args.steps, args.rounds, dtype, table_chip(device.device_kind))
        rows.append(row)
        print(f"{name}: matmul {row['matmul_flops'] / 1e9:.0f} GFLOP/s ({dtype} 2048^3), memory "
              f"{row['memory_bandwidth'] / 1e9:.1f} GB/s (best of {args.rounds} rounds)")
        for chip_name, p in row["predicted"].items():
            s = p["step_s"]
            print(f"{name:<12} {chip_name:<14} predicted {s['overlap'] * 1e3:8.1f} / {s['roofline'] * 1e3:8.1f} / "
                  f"{s['serial'] * 1e3:8.1f} ms (overlap / op by op / serial, {p['bound']}-bound); measured "
                  f"{row['measured_s'] * 1e3:8.1f} ms = {row['measured_s'] / s['roofline']:.2f}x op by op, "
                  f"{row['measured_s'] / s['serial']:.2f}x serial; {p['op_executions']} ops per step")
    RESULTS.mkdir(exist_ok=True)
    out = {"device": device.device_kind, "platform": device.platform, "matmul_dtype": dtype, "rows": rows,
           "command": " ".join(["python bench/perf_model.py", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load": os.getloadavg(), "jax": jax.__version__, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine()}
    (RESULTS / "perf_model.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
