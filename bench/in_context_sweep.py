"""What makes the TTT layer learn in context: bench/in_context.py's TTT model under one setting at a time.

    python bench/in_context_sweep.py [--out_dir bench/results/in_context_sweep] [--steps 300]
        [--only NAME,NAME] [--preset test]

Each setting trains the TTT variant of bench/in_context.py (same data, seed and steps) with one
change, keeps a checkpoint every `--eval_every` steps and scores each on the held-out sequences.
Reported per setting: the held-out CE past the window's receptive field at the end, its gain over
the best any window-only model can do (the Bayes bound of in_context.py), the first checkpoint
step that beats that bound (and by 0.1 / 0.2 nats), and from bench/ttt_probe.py the mean gate
|tanh(alpha)|, the inner step size, the inner-loop loss of the last mini-batch before its update
relative to W0's (below 1: memory) and the gradient norms of W1, the gates and the inner-lr
weights. Writes OUT/sweep.json and prints a Markdown table (BENCHMARKS.md has one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import in_context

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
}
GAINS = (0.0, 0.1, 0.2)


def summarize(result: dict) -> dict:
    """One row of the table from an in_context.json of a TTT-only run with --eval_every."""
    ttt = result["variants"]["ttt"]
    bound = result["bounds"]["window_segments"]["beyond_window"]
    layer = result["probe"]["inner"][0]
    before = np.mean([h[-1] for h in layer["before"]])
    init = np.mean([h[-1] for h in layer["init"]])
    grads = result["probe"]["gradient_norms"]
    return {
        "beyond_window": ttt["beyond_window"], "second_half": ttt["second_half"],
        "gain_over_window_bound": bound - ttt["beyond_window"],
        "steps_to_beat_bound": {str(g): in_context.steps_to(ttt["learning_curve"], bound, g) for g in GAINS},
        "gate_mean_abs": layer["gate_mean_abs"], "inner_lr_mean": float(np.mean(layer["inner_lr_mean"])),
        "last_minibatch_before_over_init": float(before / init),
        "grad_norm": {k: grads.get(k) for k in ("ttt/W1", "gating_alpha", "ttt/learnable_ttt_lr_weight", "ttt/wk/kernel")},
        "train_wall_s": ttt["train_wall_s"],
    }


def table(rows: dict[str, dict], bound: float) -> str:
    lines = [f"best possible with the window only, past its receptive field: {bound:.3f} nats",
             "| setting | CE past window | gain over window bound | steps to beat bound (+0 / +0.1 / +0.2) | "
             "gate abs(tanh) | inner lr | last mini-batch loss before/W0 | grad W1 / gate / lr-weight |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        steps = " / ".join(str(r["steps_to_beat_bound"][str(g)] or "-") for g in GAINS)
        g = r["grad_norm"]
        lines.append(f"| {name} | {r['beyond_window']:.3f} | {r['gain_over_window_bound']:+.3f} | {steps} | "
                     f"{r['gate_mean_abs']:.2f} | {r['inner_lr_mean']:.4f} | {r['last_minibatch_before_over_init']:.2f} | "
                     f"{g['ttt/W1']:.2e} / {g['gating_alpha']:.2e} / {g['ttt/learnable_ttt_lr_weight']:.2e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=str(in_context.ROOT / "bench" / "results" / "in_context_sweep"))
    parser.add_argument("--preset", choices=sorted(in_context.PRESETS), default="test")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--only", default="", help="comma-separated setting names (default: all)")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"--only: unknown settings {unknown}; known: {list(SETTINGS)}")
    out = Path(args.out_dir).absolute()
    path = out / "sweep.json"
    sweep = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    began = time.perf_counter()
    for name in names:
        run_out = out / name.replace("=", "_")
        argv_run = ["--preset", args.preset, "--variants", "ttt", "--out_dir", str(run_out),
                    "--eval_every", str(args.eval_every)] + [f"--set={s}" for s in SETTINGS[name]]
        if args.steps:
            argv_run += ["--steps", str(args.steps)]
        in_context.main(argv_run)
        result = json.loads((run_out / "in_context.json").read_text())
        sweep["rows"][name] = summarize(result)
        sweep.update(bound=result["bounds"]["window_segments"]["beyond_window"], steps=result["steps"],
                     preset=args.preset, date=result["date"], machine=result["machine"],
                     command="python bench/in_context_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]))
        path.write_text(json.dumps(sweep, indent=1))
    print(table({n: sweep["rows"][n] for n in SETTINGS if n in sweep["rows"]}, sweep["bound"]))
    print(f"wrote {path} ({time.perf_counter() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
