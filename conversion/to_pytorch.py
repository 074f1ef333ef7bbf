"""Export a tttjax model to the PyTorch (moshi) safetensors layout.

`export_tensors` is what the training checkpoint's `consolidated/` item and the
`python -m conversion.to_pytorch` tool write: either the full model with LoRA merged
(`consolidated.safetensors`, config.json says `"lora": false`) or the adapters only
(`lora.safetensors`: LoRA A/B + every TTT tensor, config.json with the lora keys).
"""

from __future__ import annotations

import dataclasses

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
