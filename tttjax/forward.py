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

from tttjax import cli, rundir
from tttjax.data.codes import load_codes
from tttjax.errors import UserError
from tttjax.model.moshi import initial_tokens
from tttjax.model.streaming import StreamingLM, chunked_forward
from tttjax.weights.loader import open_weights
from tttjax.weights.sources import materialize


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tttjax.forward", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_checkpoint_dir(parser)
    parser.add_argument("--codes", required=True, help=".npy int array [B, 17, T]")
    parser.add_argument("--out", required=True, help="output .npz")
    cli.add_dtype(parser)
    parser.add_argument("--streaming", action="store_true",
                        help="compute the logits step by step with carried KV cache and TTT state")
    parser.add_argument("--chunk_size", type=int, default=1, help="frames per streaming call (with --streaming)")
    cli.add_attention_impl(parser)
    args = parser.parse_args(argv)

    rundir.check_output_file(args.out, "--out")
    if args.streaming and args.chunk_size < 1:
        raise UserError(f"--chunk_size={args.chunk_size} must be >= 1")
    weights = open_weights(args.checkpoint_dir, dtype=args.dtype or "float32",  # config only: cheap
                           attention_impl=args.attention_impl)
    codes = load_codes(args.codes, initial_tokens(weights.cfg))  # each stream's initial token = its vocab size
    model = materialize(weights.cfg, weights.source, source_name=str(weights.path))
    if args.streaming:
        out = chunked_forward(StreamingLM(model), codes, args.chunk_size)
    else:
        out = nnx.jit(lambda m, c: m(c))(model, jnp.asarray(codes))
    try:
        np.savez(args.out, **{k: np.asarray(v) for k, v in out._asdict().items()})
    except OSError as e:
        raise UserError(f"--out={args.out}: cannot write it ([Errno {e.errno}] {e.strerror})") from None
    print(f"wrote {args.out}: text_logits {out.text_logits.shape}, logits {out.logits.shape}")
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
