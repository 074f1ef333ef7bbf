"""Import PyTorch (moshi) safetensors weights into a tttjax params checkpoint.

    python -m conversion.from_pytorch --weights W.safetensors --config config.json --out DIR \
        [--lora L.safetensors] [--param_dtype auto|float32|bfloat16]

Accepts the moshi in-memory layout (`in_projs.N`, what moshi-finetune writes) and the released
fused layout (`in_proj_weight`), LoRA tensors in the weights file or in `--lora`, and TTT tensors
(DESIGN.md section 7) with a `"ttt"` block in config.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from conversion import layout
from tttjax.model.config import ModelConfig, from_config_json

# Keys that PyTorch TTT-Moshi checkpoints carry and that have no meaning here.
_IGNORED_MARKERS = ("backward_ssm_gating", "original_layer")


class ConversionError(ValueError):
    """A weights file that does not fit the config; the message lists every offending key."""


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a file as numpy (bfloat16 via ml_dtypes); a clear error for a broken file."""
    from safetensors import SafetensorError
    from safetensors.flax import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return {k: np.asarray(v) for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None


def _canonical(name: str) -> str:
    """moshi's in-memory LoRA naming wraps the base weight: `X.frozen_W.weight` -> `X.weight`."""
    return name.replace(".frozen_W.weight", ".weight")


def collect_tensors(weights: str | Path, lora: str | Path | None) -> dict[str, np.ndarray]:
    tensors = {_canonical(k): v for k, v in read_safetensors(weights).items()}
    if lora is not None:
        tensors.update({_canonical(k): v for k, v in read_safetensors(lora).items()})
    return {k: v for k, v in tensors.items() if not any(m in k for m in _IGNORED_MARKERS)}


def infer_lora_rank(tensors: dict[str, np.ndarray]) -> int:
    ranks = {v.shape[0] for k, v in tensors.items() if k.endswith(".lora_A.weight")}
    if len(ranks) > 1:
        raise ConversionError(f"LoRA tensors have different ranks {sorted(ranks)}")
    return ranks.pop() if ranks else 0


def tensors_to_params(cfg: ModelConfig, tensors: dict[str, np.ndarray], *, source: str):
    """Fill a flat {flax path: array} dict from PyTorch tensors, checking names and shapes."""
    from flax import nnx

    from tttjax.model.moshi import abstract_model

    table = layout.rows(cfg, layout.detect_layout(tensors))
    abstract = {tuple(str(k) for k in path): v for path, v in nnx.to_flat_state(nnx.state(abstract_model(cfg)))}
    dtype = cfg.jnp_param_dtype
    params = {path: np.zeros(v.shape, dtype) for path, v in abstract.items()}
    missing = [r.name for r in table if r.name not in tensors]
    expected = {r.name for r in table}
    unexpected = sorted(k for k in tensors if k not in expected)
    wrong = [f"{r.name} {tuple(tensors[r.name].shape)} (expected {r.torch_shape(abstract[r.path].shape)})"
             for r in table if r.name in tensors
             and tuple(tensors[r.name].shape) != r.torch_shape(abstract[r.path].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if wrong:
        problems.append(f"wrong shapes {wrong}")
    if problems:
        raise ConversionError(f"{source} does not match its config: " + "; ".join(problems))
    for row in table:
        for index, value in row.from_torch(tensors[row.name]):
            params[row.path][index] = value.astype(dtype)
    return params


def build_model(cfg: ModelConfig, params: dict[tuple[str, ...], np.ndarray]):
    """A MoshiLM holding exactly `params` (flat dict by path)."""
    from flax import nnx

    from tttjax.model.moshi import abstract_model

    graphdef, state = nnx.split(abstract_model(cfg))
    flat = nnx.to_flat_state(state)
    for path, variable in flat:
        variable.set_value(params[tuple(str(k) for k in path)])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_pytorch(weights: str | Path, config: str | Path, lora: str | Path | None = None,
                 param_dtype: str = "auto", **overrides):
    """PyTorch files -> MoshiLM (used by the CLI and by tests)."""
    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found")
    data = json.loads(config.read_text())
    tensors = collect_tensors(weights, lora)
    if param_dtype == "auto":
        param_dtype = "bfloat16" if next(iter(tensors.values())).dtype.name == "bfloat16" else "float32"
    cfg = from_config_json(data, source=str(config), lora_rank=infer_lora_rank(tensors),
                           param_dtype=param_dtype, dtype=overrides.pop("dtype", param_dtype), **overrides)
    if data.get("lora") and cfg.lora_rank == 0:
        print(f"note: {config} says lora=true but no LoRA tensors were given; importing the base model",
              file=sys.stderr)
    return build_model(cfg, tensors_to_params(cfg, tensors, source=str(weights)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="PyTorch safetensors (moshi or release layout)")
    parser.add_argument("--config", required=True, help="moshi LM config.json (lm_kwargs, + lora/ttt keys)")
    parser.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    parser.add_argument("--lora", default=None, help="optional lora.safetensors (LoRA A/B and TTT tensors)")
    parser.add_argument("--param_dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="stored parameter dtype (auto = the weights file's)")
    args = parser.parse_args(argv)
    from tttjax.checkpoint.model_dir import save_model

    try:
        model = load_pytorch(args.weights, args.config, args.lora, args.param_dtype)
        save_model(args.out, model)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg = model.cfg
    print(f"wrote {args.out}: lora_rank={cfg.lora_rank} ttt_layers={list(cfg.ttt_layers)} "
          f"param_dtype={cfg.param_dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
