"""Export a tttjax model or checkpoint to the PyTorch (moshi) safetensors layout.

    python -m conversion.to_pytorch --checkpoint_dir DIR --out OUT [--dtype bfloat16|float16|float32]
        [--adapters_only] [--layout moshi|release]

Writes either the full model with LoRA merged (`consolidated.safetensors`, config.json says
`"lora": false`) or the adapters only (`lora.safetensors`: LoRA A/B + every TTT tensor, config.json
with the lora keys), streaming tensor by tensor (conversion/export.py). The CLI never builds the
model when the checkpoint's base weights are on disk.
"""

from __future__ import annotations

import argparse
import sys

import jax

from conversion import layout
from conversion.export import plan_export
from tttjax import rundir
from tttjax.platforms import select_platforms
from tttjax.weights import open_weights


def main(argv=None) -> int:
    select_platforms()
    parser = argparse.ArgumentParser(prog="python -m conversion.to_pytorch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", required=True, help="training step dir or imported checkpoint")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--adapters_only", action="store_true", help="lora.safetensors: LoRA A/B + TTT tensors")
    parser.add_argument("--layout", default="moshi", choices=list(layout.LAYOUTS),
                        help="moshi: in-memory names (moshi-finetune); release: fused names")
    args = parser.parse_args(argv)
    try:
        rundir.check_output_dir(args.out, "--out")
        weights = open_weights(args.checkpoint_dir)
        export = plan_export(weights.cfg, weights.source, layout_name=args.layout, dtype=args.dtype,
                             adapters_only=args.adapters_only)
        target = export.write(args.out, writer=jax.process_index() == 0)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {target} ({len(export.rows)} tensors, {args.dtype}, layout {args.layout})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
