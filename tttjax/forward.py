"""Teacher-forced logits of a checkpoint: the logits checker to run after a conversion.

    python -m tttjax.forward --checkpoint_dir DIR --codes codes.npy --out out.npz [--dtype float32]

codes.npy holds int codes [B, 17, T] (-1 = no token). out.npz gets `text_logits`, `logits`,
`text_mask`, `mask`, exactly as moshi's `LMModel.forward` returns them.

With --streaming the same logits are computed through the streaming path (tttjax.model.streaming):
--chunk_size frames at a time (default 1: frame by frame) with the KV cache and the TTT state
carried between calls; a model with ttt.causal=false is refused there.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion.sources import materialize
from tttjax import rundir
from tttjax.platforms import select_platforms
from tttjax.data.codes import load_codes
from tttjax.model.moshi import initial_tokens
from tttjax.model.streaming import StreamingLM, chunked_forward
from tttjax.weights import add_attention_impl_flag, open_weights


def main(argv=None) -> int:
    select_platforms()
    parser = argparse.ArgumentParser(prog="python -m tttjax.forward", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", required=True, help="imported checkpoint or training step dir")
    parser.add_argument("--codes", required=True, help=".npy int array [B, 17, T]")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="compute dtype (default: float32)")
    parser.add_argument("--streaming", action="store_true",
                        help="compute the logits step by step with carried KV cache and TTT state")
    parser.add_argument("--chunk_size", type=int, default=1, help="frames per streaming call (with --streaming)")
    add_attention_impl_flag(parser)
    args = parser.parse_args(argv)

    try:
        rundir.check_output_file(args.out, "--out")
        if args.streaming and args.chunk_size < 1:
            raise ValueError(f"--chunk_size={args.chunk_size} must be >= 1")
        weights = open_weights(args.checkpoint_dir, dtype=args.dtype or "float32",  # config only: cheap
                               attention_impl=args.attention_impl)
        codes = load_codes(args.codes, initial_tokens(weights.cfg))  # each stream's initial token = its vocab size
        model = materialize(weights.cfg, weights.source, source_name=str(weights.path))
        if args.streaming:
            streamer = StreamingLM(model)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.streaming:
        out = chunked_forward(streamer, codes, args.chunk_size)
    else:
        out = nnx.jit(lambda m, c: m(c))(model, jnp.asarray(codes))
    try:
        np.savez(args.out, **{k: np.asarray(v) for k, v in out._asdict().items()})
    except OSError as e:
        print(f"error: --out={args.out}: cannot write it ([Errno {e.errno}] {e.strerror})", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: text_logits {out.text_logits.shape}, logits {out.logits.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
