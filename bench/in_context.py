"""Do the TTT layers learn in context beyond the attention window? Three models, one task, one plot.

    python bench/in_context.py [--preset demo|test] [--out_dir bench/results/in_context]
        [--variants ttt,window,full] [--steps N] [--set ttt.base_lr=3 ...]

The task ("a per-sequence voice"): every sequence draws its own set of `voice` = 16 of Moshi's
`card` = 64 semantic tokens, and its semantic codebook (stream 1) is a uniform i.i.d. draw from
that set at every frame; the other 16 streams are -1 (no token: zero embedding, no loss). Nothing
but the sequence's own past tells which 16 tokens it uses, so the best possible prediction of a
frame depends on how much of the past a model can see:
* a model with attention window `context` and L layers sees R = L * (context - 1) + 1 frames back
  (each layer reaches context - 1 frames further). Its best cross-entropy is that of the Bayes
  predictor given the last R tokens: a token already seen there has probability 1/16, the rest
  share the remaining mass over the 64 - d unseen candidates (d distinct seen). With R = 7 that
  stays ~3.88 nats at every frame past R, however long the sequence;
* a model that remembers the whole past approaches log 16 = 2.77 nats once it has seen the set.
A TTT layer can carry the set in its inner weights (its inner model learns to reconstruct the
sequence's values from their keys, mini-batch after mini-batch); the window-only model cannot.
The gap between the two Bayes curves is what memory beyond the window is worth here; both are
computed exactly on the held-out sequences and drawn beside the trained models.

What it does, as a user would:
1. writes OUT/data/train (a prepared DATA_DIR, tttjax.data.shards format: what
   tttjax.data.prepare writes) and OUT/data/heldout.npy (sequences of another seed, never trained on);
2. trains each variant from the same seed and data with `python -m tttjax.main
   --config=configs/in_context.py`: ttt (a TTT layer at temporal layer 1), window (the same model
   with ttt.enable=false) and full (no TTT, model.context = the sequence length: the upper bound);
3. evaluates each final checkpoint with `python -m tttjax.eval.long_context` on the held-out codes
   (chunked: 12 frames per call, KV cache and TTT state carried, as at inference) and the TTT model
   also with --chunk_size 0 (the full-sequence forward training optimised): the two must agree;
4. writes OUT/in_context.json (curves, bounds, summary, the TTT probe of bench/ttt_probe.py:
   inner-loop losses per mini-batch and gradient norms of the TTT weights and gates) and
   OUT/in_context.png (per-frame CE of the semantic codebook for the three models and the bounds;
   the inner-loop losses).
`--eval_every N` also has the trainer score its weights on the held-out codes every N steps
(`evals.long_context`, the same chunked evaluation; the learning curve, for steps to a given gain).
Exit status 1 if the TTT model's mean CE past the receptive field is not below the window-only
Bayes bound (so below every window-only model, the trained one included) by `--margin` nats.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import ttt_probe

from tttjax import cli, rundir
from tttjax.config import reader
from tttjax.data import shards
from tttjax.data.streams import FRAME_RATE, MIMI_CARD, NO_TOKEN, NUM_STREAMS, SAMPLE_RATE, STREAM_NAMES
from tttjax.errors import UserError
from tttjax.weights.loader import load_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "in_context.py"
SEMANTIC = 1  # Moshi's semantic codebook: row 1 of the [17, T] codes
CURVE_COLUMN = "audio_q0_ce"  # its per-frame CE in tttjax.eval.long_context's CSV
CHUNK_SIZE = 12  # frames per call of the chunked evaluation: not a multiple of the mini-batch (8), so the
# carried TTT state crosses chunk boundaries mid mini-batch
VARIANTS = {  # name -> config overrides on top of configs/in_context.py ({frames}: the sequence length)
    "ttt": [],
    "window": ["ttt.enable=false"],
    "full": ["ttt.enable=false", "model.context={frames}"],
}
LABELS = {"ttt": "TTT (window + TTT layer)", "window": "window only", "full": "full attention"}
GAINS = (0.0, 0.1, 0.2)  # nats below the window-only Bayes bound, for "steps to a given gain"
PRESETS = {  # steps, training sequences, held-out sequences
    "test": {"steps": 300, "train": 4096, "heldout": 64},
    "demo": {"steps": 600, "train": 8192, "heldout": 128},
}


# ---------------------------------------------------------------------------------------------
# The task


def voice_example(rng: np.random.Generator, *, card: int, voice: int, frames: int) -> np.ndarray:
    """One sequence [17, frames]: the semantic codebook draws from this sequence's own `voice`
    tokens of `card`; every other stream is -1."""
    codes = np.full((NUM_STREAMS, frames), NO_TOKEN, np.int32)
    tokens = rng.choice(card, voice, replace=False)
    codes[SEMANTIC] = tokens[rng.integers(voice, size=frames)]
    return codes


def examples(split: int, count: int, *, seed: int, card: int, voice: int, frames: int) -> list[np.ndarray]:
    """`count` sequences of a split (0 train, 1 held out): example i from (seed, split, i) alone."""
    return [voice_example(np.random.default_rng([seed, split, i]), card=card, voice=voice, frames=frames)
            for i in range(count)]


def write_prepared(out: Path, codes: list[np.ndarray], *, text_card: int) -> None:
    """A prepared DATA_DIR holding `codes` in one shard, with the metadata tttjax.data.prepare writes."""
    out.mkdir(parents=True, exist_ok=True)
    shard = shards.write_shard(out / shards.shard_name(0, 1), codes)
    frames = max(c.shape[1] for c in codes)
    shards.write_json(out / shards.METADATA, {
        "format": shards.FORMAT, "created_by": "bench/in_context.py", "frame_rate": FRAME_RATE,
        "sample_rate": SAMPLE_RATE, "num_streams": NUM_STREAMS, "streams": STREAM_NAMES,
        "special_ids": {"text_pad": 3, "end_of_pad": 0, "no_token": NO_TOKEN}, "dtype": "int32",
        "duration_sec": frames / FRAME_RATE, "max_frames_per_example": frames, "num_examples": len(codes),
        "num_frames": int(sum(c.shape[1] for c in codes)), "audio_sec": 0.0, "card": MIMI_CARD,
        "text_card": text_card, "max_text_id": int(max(c[0].max() for c in codes)),
        "max_audio_id": int(max(c[1:].max() for c in codes)), "num_sources": 0, "num_skipped": 0,
        "inputs": {}, "shards": [shard], "sources": []})


def receptive_field(num_layers: int, context: int) -> int:
    """Frames a window-only model's prediction can depend on: each layer reaches context - 1 back."""
    return num_layers * (context - 1) + 1


def bayes_curves(codes: np.ndarray, *, card: int, voice: int, receptive: int) -> dict[str, np.ndarray]:
    """Per-frame CE [T] of the Bayes-optimal predictor of the semantic codebook of `codes`
    [B, 17, T] seeing the last `receptive` tokens ("window") or all earlier ones ("full"): given
    d distinct tokens seen, a seen token has probability 1/voice and an unseen one
    (voice - d) / (voice * (card - d)) (every voice set containing the seen tokens is equally likely)."""
    tokens = codes[:, SEMANTIC]
    B, T = tokens.shape
    out = {}
    for name, reach in (("window", receptive), ("full", T)):
        ce = np.zeros((B, T))
        for b in range(B):
            for t in range(T):
                seen = set(tokens[b, max(0, t - reach):t].tolist())
                d = len(seen)
                p = 1.0 / voice if tokens[b, t] in seen else (voice - d) / (voice * (card - d))
                ce[b, t] = -np.log(p)
        out[name] = ce.mean(axis=0)
    return out


def segment_means(curve: np.ndarray, receptive: int) -> dict[str, float]:
    """Mean CE over the frames past the receptive field [R, T) ("beyond_window") and the second half."""
    T = len(curve)
    return {"beyond_window": float(np.mean(curve[receptive:])), "second_half": float(np.mean(curve[T // 2:]))}


def check_gain(ttt_curve: np.ndarray, window_bound: np.ndarray, receptive: int, margin: float) -> tuple[bool, str]:
    """Whether the TTT model's mean CE past the receptive field is below the window-only Bayes bound
    (the best any model seeing only the last `receptive` frames can do on these sequences) by more
    than `margin` nats, with the numbers. Every window-only model, the trained one included, is at
    or above that bound in expectation, so passing this beats it too."""
    ttt, bound = (segment_means(c, receptive)["beyond_window"] for c in (ttt_curve, window_bound))
    ok = ttt < bound - margin
    return ok, (f"CE past the receptive field (frames >= {receptive}): TTT {ttt:.4f}, best possible with the "
                f"window only {bound:.4f}, gain {bound - ttt:.4f} nats ({'>' if ok else 'not >'} the margin {margin})")


# ---------------------------------------------------------------------------------------------
# Running the CLIs


def _run(argv: list[str], log: Path) -> float:
    """Runs `python argv...` from the repo root, output to `log`; returns the wall time."""
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, *argv], check=False, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = log.read_text().strip().splitlines()[-5:]
        raise UserError(f"python {' '.join(argv)} failed ({done.returncode}); {log}:\n" + "\n".join(tail))
    return time.perf_counter() - start


def config_args(overrides: list[str]) -> list[str]:
    return [f"--config={CONFIG}"] + [f"--config.{o}" for o in overrides]


def train(out: Path, variant: str, overrides: list[str]) -> float:
    """Trains one variant with tttjax.main into OUT/runs/<variant>; returns the wall time (s)."""
    return _run(["-m", "tttjax.main", *config_args(overrides)], out / f"train_{variant}.log")


def read_curve(eval_dir: Path) -> np.ndarray:
    """The semantic codebook's CE per frame from a long-context evaluation's CSV."""
    with open(eval_dir / "long_context_curve.csv") as f:
        return np.array([float(row[CURVE_COLUMN]) for row in csv.DictReader(f)])


def evaluate(out: Path, name: str, step_dir: Path, codes: Path, chunk_size: int) -> np.ndarray:
    """tttjax.eval.long_context on the held-out codes -> the semantic codebook's CE per frame."""
    eval_dir = out / "eval" / name
    _run(["-m", "tttjax.eval.long_context", "--checkpoint_dir", str(step_dir), "--codes", str(codes),
          "--out_dir", str(eval_dir), "--chunk_size", str(chunk_size), "--buckets", "0"], out / f"eval_{name}.log")
    return read_curve(eval_dir)


def learning_curve(run_dir: Path, receptive: int) -> list[dict]:
    """Held-out CE of the run's evaluations during training (evals.long_context: the trainer's
    weights every `freq` steps, run_dir/eval/long_context/step_N/), step by step."""
    rows = []
    for path in sorted((rundir.evals_dir(run_dir) / "long_context").glob("step_*")):
        rows.append({"step": int(path.name.removeprefix("step_")), **segment_means(read_curve(path), receptive)})
    return rows


def steps_to(rows: list[dict], reference: float, gain: float) -> int | None:
    """First evaluated step whose CE past the receptive field is below reference - gain (None: never)."""
    return next((r["step"] for r in rows if r["beyond_window"] < reference - gain), None)


def probe(step_dir: Path, codes: np.ndarray) -> dict:
    """bench/ttt_probe.py on the TTT model: inner-loop losses per mini-batch, gradient norms."""
    model = load_model(step_dir)
    return {"inner": ttt_probe.inner_losses(model, codes), "gradient_norms": ttt_probe.gradient_norms(model, codes),
            "parameter_norms": ttt_probe.parameter_norms(model)}


# ---------------------------------------------------------------------------------------------
# Output


def binned(curve, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(bin centres, means) of `curve` over consecutive bins of `width` frames: the per-frame means
    over a few dozen sequences are noisy, their bin means are what the plot compares."""
    n = len(curve) // width
    return (np.arange(n) + 0.5) * width - 0.5, np.asarray(curve[:n * width]).reshape(n, width).mean(axis=1)


def write_plot(path: Path, result: dict) -> None:
    """Per-frame CE of each model and the bounds; the learning curves (with --eval_every); the
    TTT probe's inner-loop losses (when it ran)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probe_data = result.get("probe")
    learned = {n: v["learning_curve"] for n, v in result["variants"].items() if v.get("learning_curve")}
    panels = 1 + bool(learned) + bool(probe_data)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2), squeeze=False)
    axes = list(axes[0])
    ax = axes.pop(0)
    K, R, bounds = result["mini_batch_size"], result["receptive_field"], result["bounds"]
    colors = {"ttt": "C0", "window": "C1", "full": "C2"}
    for name, variant in result["variants"].items():
        ax.plot(variant["curve"], color=colors[name], linewidth=0.6, alpha=0.35)
        ax.plot(*binned(variant["curve"], K), "o-", color=colors[name], markersize=3, label=LABELS[name])
    ax.plot(*binned(bounds["window"], K), "k--", linewidth=0.9, label=f"best possible, last {R} frames")
    ax.plot(*binned(bounds["full"], K), "k:", linewidth=1.1, label="best possible, whole past")
    ax.axhline(bounds["chance"], color="gray", linewidth=0.6)
    ax.axvline(R, color="gray", linestyle="--", linewidth=0.6)
    ax.set_xlabel(f"frame (thin: per frame; dots: means over {K} frames)")
    ax.set_ylabel("semantic codebook CE, held out (nats)")
    ax.set_title(f"per-sequence voice ({result['task']['voice']} of {result['task']['card']} tokens), "
                 f"window {result['context']}, {result['steps']} steps")
    ax.legend(fontsize=8)
    if learned:
        ax = axes.pop(0)
        for name, rows in learned.items():
            ax.plot([r["step"] for r in rows], [r["beyond_window"] for r in rows], "o-", color=colors[name],
                    markersize=3, label=LABELS[name])
        for key, style in (("window_segments", "--"), ("full_segments", ":")):
            ax.axhline(bounds[key]["beyond_window"], color="k", linestyle=style, linewidth=0.9)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"mean CE past frame {R}, held out (nats)")
        ax.set_title("learning curves (evals.long_context during training)")
        ax.legend(fontsize=8)
    if probe_data:
        ax = axes.pop(0)
        layer = probe_data["inner"][0]
        x = (np.arange(len(layer["before"][0])) + 1) * K
        for key, style in (("init", ":"), ("before", "-"), ("after", "--")):
            ax.plot(x, np.mean(layer[key], axis=0), style, label=f"{key} (mean of {len(layer[key])} heads)")
        ax.set_xlabel("frame (end of inner mini-batch)")
        ax.set_ylabel("inner-loop loss of the mini-batch")
        ax.set_title(f"TTT layer {layer['layer']}: W0 / start of mini-batch / after its update")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, load {load:.1f}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/in_context.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--out_dir", default=str(ROOT / "bench" / "results" / "in_context"))
    parser.add_argument("--variants", default="ttt,window,full", help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every variant, e.g. ttt.base_lr=3 (repeatable)")
    parser.add_argument("--eval_every", type=int, default=0,
                        help="the trainer also scores its weights on the held-out codes every N steps")
    parser.add_argument("--margin", type=float, default=0.05,
                        help="nats the TTT model must gain over the window-only bound past the receptive field")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--card", type=int, default=64)
    parser.add_argument("--voice", type=int, default=16)
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--no_probe", action="store_true", help="skip the TTT probe (JAX in this process)")
    args = parser.parse_args(argv)
    args.names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.names if v not in VARIANTS]
    if unknown or not args.names:
        parser.error(f"--variants: unknown {unknown}; expected a subset of {sorted(VARIANTS)}")
    args.steps = args.steps or PRESETS[args.preset]["steps"]
    args.out_dir = Path(args.out_dir).absolute()
    return args


def variant_overrides(args, train_dir: Path, heldout: Path) -> dict[str, list[str]]:
    """Each variant's config overrides (KEY=VALUE) on top of configs/in_context.py."""
    out = args.out_dir
    common = [f"data.train_data={train_dir}", f"max_steps={args.steps}", f"duration_sec={args.frames / FRAME_RATE}",
              f"model.card={args.card}", f"seed={args.seed}"]
    if args.eval_every:
        common += [f"evals.long_context.freq={args.eval_every}", f"evals.long_context.data={heldout}",
                   f"evals.long_context.chunk_size={CHUNK_SIZE}"]
    return {name: common + [f"run_dir={out / 'runs' / name}"] + [o.format(frames=args.frames) for o in VARIANTS[name]]
            + args.set for name in VARIANTS}


def run_variant(args, name: str, overrides: list[str], heldout: Path, receptive: int, window_bound: float) -> dict:
    """Trains one variant, scores its last step on the held-out codes (and, for TTT, the
    full-sequence forward too): its entry of in_context.json."""
    out, run_dir = args.out_dir, args.out_dir / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    wall = train(out, name, overrides)
    final_dir = rundir.step_dir(run_dir, args.steps)
    curve = evaluate(out, name, final_dir, heldout, CHUNK_SIZE)
    entry = {"overrides": overrides, "train_wall_s": round(wall, 1), "step": args.steps, "curve": curve.tolist(),
             **segment_means(curve, receptive)}
    if args.eval_every:
        entry["learning_curve"] = learning_curve(run_dir, receptive)
        entry["steps_to_beat_window_bound"] = {str(g): steps_to(entry["learning_curve"], window_bound, g)
                                               for g in GAINS}
    if name == "ttt":
        full_pass = evaluate(out, "ttt_full_sequence", final_dir, heldout, 0)
        entry["chunked_vs_full_sequence_max_abs_diff"] = float(np.max(np.abs(full_pass - curve)))
    print(f"{name}: trained {args.steps} steps in {wall:.0f} s; CE past the receptive field "
          f"{entry['beyond_window']:.4f}, second half {entry['second_half']:.4f}", flush=True)
    return entry


def run_demo(argv: list[str]) -> int:
    args = parse_args(argv)
    out, began = args.out_dir, time.perf_counter()
    train_dir, heldout = out / "data" / "train", out / "data" / "heldout.npy"
    overrides = variant_overrides(args, train_dir, heldout)
    # the configs each run will use: a bad --set key fails here (ConfigError), before anything is written
    configs = {name: reader.load(str(CONFIG), [tuple(o.split("=", 1)) for o in overrides[name]]) for name in VARIANTS}
    out.mkdir(parents=True, exist_ok=True)
    window = configs["window"]
    context, num_layers = int(window.model.context), int(window.model.num_layers)
    receptive = receptive_field(num_layers, context)
    task = {"card": args.card, "voice": args.voice, "frames": args.frames}
    shutil.rmtree(out / "data", ignore_errors=True)  # a rerun starts afresh (tttjax.main would resume)
    preset = PRESETS[args.preset]
    write_prepared(train_dir, examples(0, preset["train"], seed=args.seed, **task),
                   text_card=int(window.model.text_card))
    codes = np.stack(examples(1, preset["heldout"], seed=args.seed, **task))
    np.save(heldout, codes)

    result = {"command": "python bench/in_context.py " + " ".join(argv),
              "date": datetime.date.today().isoformat(), "machine": machine(), "task": task,
              "preset": args.preset, "steps": args.steps, "config": str(CONFIG.relative_to(ROOT)),
              "overrides": args.set, "frames": args.frames, "context": context, "num_layers": num_layers,
              "receptive_field": receptive, "mini_batch_size": int(configs["ttt"].ttt.mini_batch_size),
              "variants": {}}
    bounds = bayes_curves(codes, card=args.card, voice=args.voice, receptive=receptive)
    result["bounds"] = {"window": bounds["window"].tolist(), "full": bounds["full"].tolist(),
                        "chance": float(np.log(args.card)),
                        "window_segments": segment_means(bounds["window"], receptive),
                        "full_segments": segment_means(bounds["full"], receptive)}
    window_bound = result["bounds"]["window_segments"]["beyond_window"]
    variants = result["variants"]
    for name in args.names:
        variants[name] = run_variant(args, name, overrides[name], heldout, receptive, window_bound)
        if name == "ttt" and not args.no_probe:
            result["probe"] = probe(rundir.step_dir(out / "runs" / name, args.steps), codes[:16])
    print(f"best possible past the receptive field: last {receptive} frames {window_bound:.4f}, whole past "
          f"{result['bounds']['full_segments']['beyond_window']:.4f}; chance {result['bounds']['chance']:.4f}")
    status = 0
    if "ttt" in variants:
        ok, message = check_gain(np.asarray(variants["ttt"]["curve"]), bounds["window"], receptive, args.margin)
        result["gain"] = {"ok": ok, "message": message, "margin": args.margin}
        if "window" in variants:
            result["gain"]["over_window_model"] = variants["window"]["beyond_window"] - variants["ttt"]["beyond_window"]
            message += f"; over the trained window-only model {result['gain']['over_window_model']:.4f}"
        print(message)
        status = 0 if ok else 1
    result["wall_s"] = round(time.perf_counter() - began, 1)
    (out / "in_context.json").write_text(json.dumps(result, indent=1))
    write_plot(out / "in_context.png", result)
    print(f"wrote {out / 'in_context.json'} and {out / 'in_context.png'} ({result['wall_s']:.0f} s)")
    return status


def main(argv=None) -> int:
    """run_demo behind the project's CLI boundary (JAX platforms chosen first, errors as one line)."""
    return cli.run(run_demo, argv)


if __name__ == "__main__":
    sys.exit(main())
