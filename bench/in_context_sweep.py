"""What makes the TTT layer learn in context: bench/in_context.py's TTT model under one setting at a time.

    python bench/in_context_sweep.py [--out_dir bench/results/in_context_sweep] [--steps 300]
        [--only "NAME;NAME"] [--seeds 0,1,2] [--preset test]

Each setting trains the TTT variant of bench/in_context.py (same data, seed and steps) with one
change, for each of `--seeds` (data and init), and the trainer scores it on the held-out sequences
every `--eval_every` steps (evals.long_context).
Reported per setting: the held-out CE past the window's receptive field at the end, its gain over
the best any window-only model can do (the Bayes bound of in_context.py), the first evaluated
step that beats that bound (and by 0.1 / 0.2 nats), and from bench/ttt_probe.py the mean gate
|tanh(alpha)|, the inner step size, the inner-loop loss of the last mini-batch before its update
relative to W0's (below 1: memory) and the gradient norms of W1, the gates and the inner-lr
weights. Writes OUT/sweep.json and prints a Markdown table (BENCHMARKS.md has one).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import in_context
import numpy as np

from tttjax import cli

SETTINGS = {  # name -> --set overrides of bench/in_context.py (configs/in_context.py keys)
    "default": [],
    "mini_batch_size=4": ["ttt.mini_batch_size=4"],
    "mini_batch_size=16": ["ttt.mini_batch_size=16"],
    "base_lr=0.1": ["ttt.base_lr=0.1"],
    "base_lr=0.3": ["ttt.base_lr=0.3"],
    "base_lr=3": ["ttt.base_lr=3.0"],
    "base_lr=10": ["ttt.base_lr=10.0"],
    "initial_gating_alpha=0.01": ["ttt.initial_gating_alpha=0.01"],
    "initial_gating_alpha=0.5": ["ttt.initial_gating_alpha=0.5"],
    "initial_gating_alpha=1": ["ttt.initial_gating_alpha=1.0"],
    "ttt_lr_multiplier=0.3": ["optim.ttt_lr_multiplier=0.3"],
    "ttt_lr_multiplier=3": ["optim.ttt_lr_multiplier=3.0"],
    "ttt_lr_multiplier=10": ["optim.ttt_lr_multiplier=10.0"],
    "gate_lr_multiplier=10": ["optim.gate_lr_multiplier=10.0"],
    "gate_lr_multiplier=100": ["optim.gate_lr_multiplier=100.0"],
    # configs/moshi_7b_ttt.py's multipliers, and TTT-Moshi's TTTArgs defaults (weight 10, alpha 100)
    "ttt_lr 10, gate_lr 10": ["optim.ttt_lr_multiplier=10.0", "optim.gate_lr_multiplier=10.0"],
    "ttt_lr 10, gate_lr 100": ["optim.ttt_lr_multiplier=10.0", "optim.gate_lr_multiplier=100.0"],
}


def summarize(result: dict) -> dict:
    """One seed's row of the table from an in_context.json of a TTT-only run with --eval_every."""
    ttt = result["variants"]["ttt"]
    bound = result["bounds"]["window_segments"]["beyond_window"]
    layer = result["probe"]["inner"][0]
    before = np.mean([h[-1] for h in layer["before"]])
    init = np.mean([h[-1] for h in layer["init"]])
    grads = result["probe"]["gradient_norms"]
    return {
        "beyond_window": ttt["beyond_window"], "second_half": ttt["second_half"], "window_bound": bound,
        "gain_over_window_bound": bound - ttt["beyond_window"],
        "steps_to_beat_bound": ttt["steps_to_beat_window_bound"],
        "gate_mean_abs": layer["gate_mean_abs"], "inner_lr_mean": float(np.mean(layer["inner_lr_mean"])),
        "last_minibatch_before_over_init": float(before / init),
        "grad_norm": {k: grads.get(k) for k in ("ttt/W1", "gating_alpha", "ttt/learnable_ttt_lr_weight", "ttt/wk/kernel")},
        "train_wall_s": ttt["train_wall_s"],
    }


def table(rows: dict[str, dict[str, dict]]) -> str:
    """Markdown: one line per setting; numbers are means over its seeds (the gain with its range),
    steps to beat the bound per seed."""
    lines = [("| setting | seeds | CE past window | gain over window bound: mean (min, max) | steps to beat bound "
              "+0 / +0.1 / +0.2 (per seed) | gate abs(tanh) | inner lr | last mini-batch loss before/W0 | "
              "grad W1 / gate / lr-weight |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for name, by_seed in rows.items():
        seeds = sorted(by_seed, key=int)
        runs = [by_seed[s] for s in seeds]

        def mean(key, runs=runs):
            return float(np.mean([r[key] for r in runs]))

        gains = [r["gain_over_window_bound"] for r in runs]
        steps = " / ".join(",".join(str(r["steps_to_beat_bound"][str(g)] or "-") for r in runs) for g in in_context.GAINS)
        grads = " / ".join(f"{np.mean([r['grad_norm'][k] for r in runs]):.1e}"
                           for k in ("ttt/W1", "gating_alpha", "ttt/learnable_ttt_lr_weight"))
        lines.append(f"| {name} | {','.join(seeds)} | {mean('beyond_window'):.3f} | {np.mean(gains):+.3f} "
                     f"({min(gains):+.3f}, {max(gains):+.3f}) | {steps} | {mean('gate_mean_abs'):.2f} | "
                     f"{mean('inner_lr_mean'):.4f} | {mean('last_minibatch_before_over_init'):.2f} | {grads} |")
    return "\n".join(lines)


def run_sweep(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python bench/in_context_sweep.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=str(in_context.ROOT / "bench" / "results" / "in_context_sweep"))
    parser.add_argument("--preset", choices=sorted(in_context.PRESETS), default="test")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--only", default="", help="settings separated by ';' (default: all)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (data and init) for each setting")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(";") if n.strip()] or list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"--only: unknown settings {unknown}; known: {list(SETTINGS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = Path(args.out_dir).absolute()
    path = out / "sweep.json"
    sweep = json.loads(path.read_text()) if path.is_file() else {"rows": {}, "runs": []}
    began = time.perf_counter()
    for name in names:
        for seed in seeds:
            run_out = out / f"{re.sub(r'[^A-Za-z0-9.]+', '_', name)}_seed{seed}"
            argv_run = ["--preset", args.preset, "--variants", "ttt", "--out_dir", str(run_out), "--seed", str(seed),
                        "--eval_every", str(args.eval_every)] + [f"--set={s}" for s in SETTINGS[name]]
            if args.steps:
                argv_run += ["--steps", str(args.steps)]
            in_context.run_demo(argv_run)
            result = json.loads((run_out / "in_context.json").read_text())
            sweep["rows"].setdefault(name, {})[str(seed)] = summarize(result)
            sweep["runs"].append({"setting": name, "seed": seed, "steps": result["steps"], "preset": args.preset,
                                  "date": result["date"], "machine": result["machine"], "command": result["command"]})
            path.write_text(json.dumps(sweep, indent=1))
    print(table({n: sweep["rows"][n] for n in SETTINGS if n in sweep["rows"]}))
    print(f"wrote {path} ({time.perf_counter() - began:.0f} s)")
    return 0


def main(argv=None) -> int:
    return cli.run(run_sweep, argv)


if __name__ == "__main__":
    sys.exit(main())
