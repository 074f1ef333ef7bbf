"""Import PyTorch (moshi) safetensors weights into a tttjax model dir.

    python -m conversion.from_pytorch --weights W.safetensors --config config.json --out DIR \\
        [--lora L.safetensors] [--param_dtype auto|float32|bfloat16]

Accepts the moshi in-memory layout (`in_projs.N`, what moshi-finetune writes) and the released
fused layout (`in_proj_weight`), LoRA tensors in the weights file or in `--lora`, and TTT tensors
(docs/contract.md §7) with a `"ttt"` block in config.json.
"""

from __future__ import annotations

import argparse
import sys

from tttjax import cli
from tttjax.checkpoint.model_dir import save_model
from tttjax.weights.pytorch import load_pytorch


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m conversion.from_pytorch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="PyTorch safetensors (moshi or release layout)")
    parser.add_argument("--config", required=True, help="moshi LM config.json (lm_kwargs, + lora/ttt keys)")
    parser.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    parser.add_argument("--lora", default=None, help="optional lora.safetensors (LoRA A/B and TTT tensors)")
    parser.add_argument("--param_dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="stored parameter dtype (auto = the weights file's)")
    args = parser.parse_args(argv)
    model = load_pytorch(args.weights, args.config, args.lora, args.param_dtype)
    save_model(args.out, model)
    cfg = model.cfg
    print(f"wrote {args.out}: lora_rank={cfg.lora_rank} ttt_layers={list(cfg.ttt_layers)} "
          f"param_dtype={cfg.param_dtype}")
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
