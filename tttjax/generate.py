"""Streaming generation: Moshi's side of a dialogue, frame by frame, as moshi's `LMGen` produces it.

    python -m tttjax.generate --checkpoint_dir DIR --user_codes user.npy --out out.npy \\
        [--greedy | --temp 0.8 --temp_text 0.7 --top_k 250 --top_k_text 25] [--seed S] [--dtype float32]

user.npy holds the user's audio codes [B, n_q - dep_q, T] (8 Mimi codebooks for Moshi 7B, one
frame per 80 ms). out.npy gets Moshi's stream [B, 1 + dep_q, T] (row 0 text, rows 1.. audio): frame
t is what `LMGen.step` returns for input frame t, and -2 (moshi's "ungenerated") for the first
max(delays) frames, where LMGen returns None. One jit-compiled step per frame: the temporal
transformer with a ring KV cache, the TTT layers carrying their inner state (primal form), then
the depformer sampling the audio codebooks. Sampling defaults to LMGen's (temp 0.8 / text 0.7,
top-k 250 / text 25); --greedy is LMGen(use_sampling=False).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from tttjax import cli, rundir
from tttjax.data.codes import load_codes
from tttjax.errors import UserError
from tttjax.model.streaming import GREEDY, Sampling, StreamingLM, generate
from tttjax.weights.loader import open_weights
from tttjax.weights.sources import materialize


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tttjax.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_checkpoint_dir(parser)
    parser.add_argument("--user_codes", required=True, help=".npy int array [B, n_q - dep_q, T]")
    parser.add_argument("--out", required=True, help="output .npy [B, 1 + dep_q, T]")
    parser.add_argument("--greedy", action="store_true", help="argmax everywhere (LMGen use_sampling=False)")
    parser.add_argument("--temp", type=float, default=0.8, help="audio temperature (<= 0: greedy)")
    parser.add_argument("--temp_text", type=float, default=0.7, help="text temperature (<= 0: greedy)")
    parser.add_argument("--top_k", type=int, default=250, help="audio top-k (0: no cut)")
    parser.add_argument("--top_k_text", type=int, default=25, help="text top-k (0: no cut)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    cli.add_dtype(parser)
    args = parser.parse_args(argv)
    sampling = GREEDY if args.greedy else Sampling(True, args.temp, args.temp_text, args.top_k, args.top_k_text)
    if args.top_k < 0 or args.top_k_text < 0:
        raise UserError("--top_k and --top_k_text must be >= 0 (0: no cut)")
    rundir.check_output_file(args.out, "--out")
    weights = open_weights(args.checkpoint_dir, dtype=args.dtype or "float32")  # config only: cheap
    cfg = weights.cfg
    user = load_codes(args.user_codes, [cfg.card] * (cfg.n_q - cfg.dep_q), what="user codes")
    model = materialize(cfg, weights.source, source_name=str(weights.path))
    streamer = StreamingLM(model)
    times = []
    last = [time.perf_counter()]

    def on_step(t, out):
        out.block_until_ready()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    out = generate(streamer, user, sampling=sampling, seed=args.seed, on_step=on_step)
    np.save(args.out, out)
    steady = np.median(times[1:]) if len(times) > 1 else times[0]
    print(f"wrote {args.out}: {out.shape} ({'greedy' if args.greedy else sampling}); "
          f"{1 / steady:.1f} frames/s after compilation ({1 / steady / 12.5:.2f}x real time)")
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
