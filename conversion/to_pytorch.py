"""Export a tttjax model to the PyTorch (moshi) safetensors layout.

`export_tensors` is what the training checkpoint's `consolidated/` item and the
`python -m conversion.to_pytorch` tool write: either the full model with LoRA merged
(`consolidated.safetensors`, config.json says `"lora": false`) or the adapters only
(`lora.safetensors`: LoRA A/B + every TTT tensor, config.json with the lora keys).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np

from conversion import layout
from tttjax.model.config import parse_dtype, to_config_json

FULL_FILE = "consolidated.safetensors"
ADAPTERS_FILE = "lora.safetensors"


def _merged(flat: dict, path: tuple[str, ...], scaling: float) -> np.ndarray:
    """A Linear's kernel with its LoRA folded in (fp32), or the param itself."""
    value = np.asarray(jax.device_get(flat[path]), np.float32)
    if path[-1] == "kernel" and path[:-1] + ("lora_a",) in flat:
        a = np.asarray(jax.device_get(flat[path[:-1] + ("lora_a",)]), np.float32)
        b = np.asarray(jax.device_get(flat[path[:-1] + ("lora_b",)]), np.float32)
        value = value + scaling * np.matmul(a, b)
    return value


def export_tensors(model, *, layout_name: str = "moshi", dtype: str = "bfloat16",
                   adapters_only: bool = False) -> tuple[dict[str, np.ndarray], dict, str]:
    """(tensors sorted by name, config.json dict, file name) for `model`."""
    from tttjax.train.state import flat_params

    cfg = model.cfg
    flat = flat_params(model)
    np_dtype = np.dtype(parse_dtype(dtype))
    if adapters_only:
        if cfg.lora_rank == 0 and not cfg.ttt_layers:
            raise ValueError("--adapters_only: the model has neither LoRA nor TTT parameters")
        table = [r for r in layout.rows(cfg, layout_name) if r.group in ("lora", "ttt")]
        values = {p: np.asarray(jax.device_get(v), np.float32) for p, v in flat.items()}
        config, filename = to_config_json(cfg), ADAPTERS_FILE
    else:
        table = layout.rows(dataclasses.replace(cfg, lora_rank=0), layout_name)
        values = {path: _merged(flat, path, cfg.lora_scaling) for path in {r.path for r in table}}
        config, filename = to_config_json(cfg, lora=False), FULL_FILE
    tensors = {r.name: np.ascontiguousarray(r.to_torch(values[r.path])).astype(np_dtype) for r in table}
    return dict(sorted(tensors.items())), config, filename


def write_export(out_dir, tensors: dict[str, np.ndarray], config: dict, filename: str) -> Path:
    """Write `filename` (keys sorted, torch format tag) and config.json into out_dir; never overwrite."""
    import json

    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    target = out_dir / filename
    if target.exists() or (out_dir / "config.json").exists():
        raise FileExistsError(f"{out_dir} already holds an export; choose a new --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(tensors.items())), str(target), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=4, sort_keys=True))
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Export a tttjax checkpoint to PyTorch (moshi) safetensors.")
    parser.add_argument("--checkpoint_dir", required=True, help="training step dir or imported checkpoint")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--adapters_only", action="store_true", help="lora.safetensors: LoRA A/B + TTT tensors")
    parser.add_argument("--layout", default="moshi", choices=list(layout.LAYOUTS),
                        help="moshi: in-memory names (moshi-finetune); release: fused names")
    args = parser.parse_args(argv)
    from tttjax.checkpoint.model_dir import load_model

    try:
        model = load_model(args.checkpoint_dir)
        tensors, config, filename = export_tensors(model, layout_name=args.layout, dtype=args.dtype,
                                                   adapters_only=args.adapters_only)
        target = write_export(args.out, tensors, config, filename)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {target} ({len(tensors)} tensors, {args.dtype}, layout {args.layout})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
