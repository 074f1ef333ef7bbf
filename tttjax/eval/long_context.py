"""Long-context evaluation: cross-entropy at each frame index over long sequences (eval-reference.md 6).

    python -m tttjax.eval.long_context --checkpoint_dir DIR --codes a.npy [b.npy ...] --out_dir DIR \\
        [--chunk_size 64] [--buckets 0,2000,8000,32000] [--dtype float32]

Each .npy holds codes [B, 17, T] (-1 = no token); files may differ in length. The sequences run
through the chunked teacher-forced forward (`streaming.forward_chunk`): `chunk_size` frames per
call with the KV cache (the model's real attention window) and the TTT inner state carried across
calls, as at inference, so memory does not grow with T. `--chunk_size 0` runs one full-sequence
forward instead (the training computation; the only option for a ttt.causal=false model, which
cannot be chunked); with `--attention_impl` blockwise/splash/cudnn its memory is linear in T.

Writes to --out_dir:
  long_context_curve.csv   frame, then <stream>_ce and <stream>_count per stream
                           (text, text_nonpad, audio_q0..q{dep_q-1}, audio_semantic, audio_acoustic, audio)
  long_context.json        bucketed means, the slope of CE against ln(frame + 1), and the run's settings
  long_context_curve.png   semantic / acoustic / text CE against frame (log x), if matplotlib is importable
and prints the bucket table. CE is in nats, the per-frame value a token-weighted mean over sequences.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tttjax import cli
from tttjax.data.codes import load_codes
from tttjax.errors import UserError
from tttjax.model.moshi import initial_tokens
from tttjax.model.streaming import StreamingLM, iter_chunks
from tttjax.objective import token_cross_entropy
from tttjax.weights.loader import load_model

DEFAULT_BUCKETS = (0, 2000, 8000, 32000)
TABLE_STREAMS = ("text", "text_nonpad", "audio_semantic", "audio_acoustic", "audio")


def stream_names(dep_q: int) -> list[str]:
    return (["text", "text_nonpad"] + [f"audio_q{q}" for q in range(dep_q)]
            + ["audio_semantic", "audio_acoustic", "audio"])


# -log p(target) [B, S, T], 0 where masked (moshi's NaN tail and -1 targets lie there).
_token_nll = jax.jit(token_cross_entropy)


class Curve:
    """Per-frame sums and counts of token CE for each stream (host-side, float64)."""

    def __init__(self, dep_q: int, pad_ids: tuple[int, ...]):
        self.dep_q = dep_q
        self.pad_ids = pad_ids
        self.sums: dict[str, np.ndarray] = {name: np.zeros(0) for name in stream_names(dep_q)}
        self.counts: dict[str, np.ndarray] = {name: np.zeros(0) for name in stream_names(dep_q)}

    @property
    def frames(self) -> int:
        return len(self.sums["text"])

    def _grow(self, n: int) -> None:
        if n > self.frames:
            for d in (self.sums, self.counts):
                for name in d:
                    d[name] = np.concatenate([d[name], np.zeros(n - len(d[name]))])

    def _add(self, name: str, frame: np.ndarray, nll: np.ndarray, mask: np.ndarray) -> None:
        """nll, mask [B, T] at frame indices frame [T] (may be negative: dropped)."""
        keep = frame >= 0
        frame, nll, mask = frame[keep], nll[:, keep], mask[:, keep]
        if frame.size:
            self._grow(int(frame.max()) + 1)
            np.add.at(self.sums[name], frame, np.where(mask, nll, 0.0).sum(0))
            np.add.at(self.counts[name], frame, mask.sum(0))

    def add(self, frames: np.ndarray, text_nll, text_mask, text_target, audio_nll, audio_mask) -> None:
        """Frame-aligned values: text_* [B, T], audio_* [B, dep_q, T] for the frames `frames` [T] or
        per stream [1 + dep_q, T] (the chunked path, where stream k lags by its delay)."""
        frames = np.broadcast_to(frames, (1 + self.dep_q, np.shape(frames)[-1]))
        text_nll, audio_nll = np.asarray(text_nll, np.float64), np.asarray(audio_nll, np.float64)
        text_mask, audio_mask = np.asarray(text_mask, bool), np.asarray(audio_mask, bool)
        nonpad = text_mask & ~np.isin(np.asarray(text_target), self.pad_ids)
        self._add("text", frames[0], text_nll, text_mask)
        self._add("text_nonpad", frames[0], text_nll, nonpad)
        for q in range(self.dep_q):
            name = f"audio_q{q}"
            self._add(name, frames[1 + q], audio_nll[:, q], audio_mask[:, q])
            self._add("audio", frames[1 + q], audio_nll[:, q], audio_mask[:, q])
            self._add("audio_semantic" if q == 0 else "audio_acoustic", frames[1 + q], audio_nll[:, q],
                      audio_mask[:, q])

    def mean(self, name: str) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sums[name] / self.counts[name]


def chunked_curve(model, codes_list, *, chunk_size: int = 64, curve: Curve | None = None) -> Curve:
    """Per-frame CE through the streaming forward (`streaming.iter_chunks`), chunk_size frames at a
    time with the KV cache and the TTT state carried."""
    cfg = model.cfg
    curve = curve or Curve(cfg.dep_q, (cfg.existing_text_padding_id, cfg.existing_text_end_padding_id))
    streamer = StreamingLM(model)
    delays = np.asarray(cfg.delays[:1 + cfg.dep_q])[:, None]
    for codes in codes_list:
        for start, n, out in iter_chunks(streamer, np.asarray(codes, np.int32), chunk_size):
            text_nll = _token_nll(out.text_logits, out.text_targets, out.text_mask)[:, 0]
            audio_nll = _token_nll(out.logits, out.targets, out.mask)
            values = (text_nll, out.text_mask[:, 0], out.text_targets[:, 0], audio_nll, out.mask)
            frames = start + np.arange(n)[None, :] - delays  # step t of stream k scores frame t - delay_k
            curve.add(frames, *(np.asarray(v)[..., :n] for v in values))
    return curve


def single_pass_curve(model, codes_list, *, curve: Curve | None = None) -> Curve:
    """Per-frame CE from one full-sequence forward per file (`MoshiLM(codes)`); memory grows with T
    (with T^2 under attention_impl xla)."""
    cfg = model.cfg
    curve = curve or Curve(cfg.dep_q, (cfg.existing_text_padding_id, cfg.existing_text_end_padding_id))

    @nnx.jit
    def run(model, codes):
        out = model(codes)
        return (_token_nll(out.text_logits, codes[:, :1], out.text_mask)[:, 0], out.text_mask[:, 0],
                _token_nll(out.logits, codes[:, 1:1 + cfg.dep_q], out.mask), out.mask)

    # Files are right-padded with -1 to the longest (one compilation; causal, so nothing earlier changes).
    longest = max(np.shape(c)[2] for c in codes_list)
    for codes in codes_list:
        codes = np.asarray(codes, np.int32)
        B, K, T = codes.shape
        codes = np.concatenate([codes, np.full((B, K, longest - T), -1, np.int32)], axis=2)
        text_nll, text_mask, audio_nll, audio_mask = (np.asarray(v)[..., :T] for v in run(model, jnp.asarray(codes)))
        # As for the unpadded file: no prediction for a stream's last `delay` frames (moshi's NaN tail).
        text_mask = text_mask & (np.arange(T) < T - cfg.delays[0])
        audio_mask = audio_mask & (np.arange(T) < T - np.asarray(cfg.delays[1:1 + cfg.dep_q])[:, None])
        curve.add(np.arange(T), text_nll, text_mask, codes[:, 0, :T], audio_nll, audio_mask)
    return curve


def buckets_table(curve: Curve, edges=DEFAULT_BUCKETS) -> list[dict]:
    """Token-weighted mean CE per frame range [edges[i], edges[i+1]) (the last one open-ended)."""
    bounds = list(edges) + [None]
    rows = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if lo >= curve.frames:
            break
        sl = slice(lo, hi)
        row = {"bucket": f"[{lo}, {hi if hi is not None else 'end'})",
               "frames": int(min(curve.frames, hi or curve.frames) - lo)}
        for name in TABLE_STREAMS:
            count = curve.counts[name][sl].sum()
            row[f"{name}_ce"] = float(curve.sums[name][sl].sum() / count) if count else float("nan")
            row[f"{name}_tokens"] = int(count)
        rows.append(row)
    return rows


def log_slopes(curve: Curve) -> dict[str, float]:
    """Least-squares slope of per-frame CE against ln(frame + 1), weighted by token counts (nats per e-fold)."""
    out = {}
    x = np.log(np.arange(curve.frames) + 1.0)
    for name in TABLE_STREAMS:
        w = curve.counts[name]
        if (w > 0).sum() < 2:
            out[name] = float("nan")
            continue
        y = np.where(w > 0, curve.mean(name), 0.0)
        xm = (w * x).sum() / w.sum()
        ym = (w * y).sum() / w.sum()
        var = (w * (x - xm) ** 2).sum()
        out[name] = float((w * (x - xm) * (y - ym)).sum() / var) if var > 0 else float("nan")
    return out


def write_csv(curve: Curve, path: Path) -> None:
    names = stream_names(curve.dep_q)
    cols = [np.arange(curve.frames)]
    header = ["frame"]
    for name in names:
        cols += [curve.mean(name), curve.counts[name]]
        header += [f"{name}_ce", f"{name}_count"]
    lines = [",".join(header)]
    for i in range(curve.frames):
        lines.append(",".join([str(i)] + [f"{cols[1 + 2 * j][i]:.6f},{int(cols[2 + 2 * j][i])}"
                                          for j in range(len(names))]))
    path.write_text("\n".join(lines) + "\n")


def write_plot(curve: Curve, path: Path, *, context: int | None, title: str) -> None:
    """PNG of the per-frame curves (log frame axis), with the attention context marked."""
    import matplotlib  # heavy: only this CLI's plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(curve.frames) + 1
    for name in ("audio_semantic", "audio_acoustic", "text"):
        if curve.counts[name].sum():
            ax.plot(x, curve.mean(name), label=name, linewidth=0.8)
    if context is not None and context < curve.frames:
        ax.axvline(context, color="gray", linestyle="--", linewidth=0.8, label=f"attention context {context}")
    ax.set_xscale("log")
    ax.set_xlabel("frame index + 1 (12.5 frames/s)")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(curve: Curve, out_dir: Path, *, edges, context: int | None, title: str, settings: dict) -> dict:
    """The curve's CSV, JSON (bucketed means, slopes, `settings`) and PNG in `out_dir`; returns the JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(curve, out_dir / "long_context_curve.csv")
    result = {**settings, "context": context, "frames": curve.frames, "buckets": buckets_table(curve, edges),
              "slope_vs_ln_frame": log_slopes(curve)}
    (out_dir / "long_context.json").write_text(json.dumps(result, indent=2))
    write_plot(curve, out_dir / "long_context_curve.png", context=context, title=title)
    return result


def format_table(rows: list[dict]) -> str:
    cols = ["bucket", "frames"] + [f"{n}_ce" for n in TABLE_STREAMS]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for row in rows:
        lines.append(" | ".join(f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in cols))
    return "\n".join(lines)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tttjax.eval.long_context", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_checkpoint_dir(parser)
    parser.add_argument("--codes", required=True, nargs="+", help=".npy int arrays [B, 17, T]")
    parser.add_argument("--out_dir", required=True, help="where the CSV / JSON / PNG go")
    parser.add_argument("--chunk_size", type=int, default=64,
                        help="frames per forward call with carried state; 0 = one full-sequence forward")
    parser.add_argument("--buckets", default=",".join(map(str, DEFAULT_BUCKETS)), help="bucket edges in frames")
    cli.add_dtype(parser)
    cli.add_attention_impl(parser)
    args = parser.parse_args(argv)
    try:
        edges = sorted({int(e) for e in args.buckets.split(",") if e.strip()} | {0})
    except ValueError:
        raise UserError(f"--buckets={args.buckets}: expected comma-separated frame indices") from None
    if args.chunk_size < 0:
        raise UserError(f"--chunk_size={args.chunk_size} must be >= 0")
    model = load_model(args.checkpoint_dir, dtype=args.dtype or "float32", attention_impl=args.attention_impl)
    cfg = model.cfg
    codes = [load_codes(p, initial_tokens(cfg)) for p in args.codes]
    if args.chunk_size > 0:
        curve = chunked_curve(model, codes, chunk_size=args.chunk_size)
    else:
        curve = single_pass_curve(model, codes)
    result = write_results(curve, Path(args.out_dir), edges=edges, context=cfg.context,
                           title=f"{Path(args.checkpoint_dir).name}: CE by frame",
                           settings={"checkpoint_dir": str(args.checkpoint_dir), "codes": args.codes,
                                     "chunk_size": args.chunk_size, "ttt_layers": list(cfg.ttt_layers)})
    print(format_table(result["buckets"]))
    print("slope of CE vs ln(frame + 1):", {k: round(v, 4) for k, v in result["slope_vs_ln_frame"].items()})
    print(f"wrote {args.out_dir}/long_context_curve.csv, long_context.json, long_context_curve.png")
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
