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
from conversion.safetensors_io import SafetensorsReader
from conversion.sources import ParamSource, copy_into
from tttjax.model.config import ModelConfig, from_config_json

# Keys that PyTorch TTT-Moshi checkpoints carry and that have no meaning here.
_IGNORED_MARKERS = ("backward_ssm_gating", "original_layer")


class ConversionError(ValueError):
    """A weights file that does not fit the config; the message lists every offending key."""


def _canonical(name: str) -> str:
    """moshi's in-memory LoRA naming wraps the base weight: `X.frozen_W.weight` -> `X.weight`."""
    return name.replace(".frozen_W.weight", ".weight")


def open_files(weights: str | Path, lora: str | Path | None) -> dict[str, tuple[SafetensorsReader, str]]:
    """{canonical name: (reader, stored name)} over the weights file and the optional LoRA/TTT
    file (which wins on a clash); reads headers only."""
    found = {}
    for path in (weights, lora) if lora is not None else (weights,):
        reader = SafetensorsReader(path)
        found.update({_canonical(n): (reader, n) for n in reader.names()
                      if not any(m in n for m in _IGNORED_MARKERS)})
    return found


def infer_lora_rank(files: dict[str, tuple[SafetensorsReader, str]]) -> int:
    ranks = {r.shape(n)[0] for k, (r, n) in files.items() if k.endswith(".lora_A.weight")}
    if len(ranks) > 1:
        raise ConversionError(f"LoRA tensors have different ranks {sorted(ranks)}")
    return ranks.pop() if ranks else 0


class TorchSource(ParamSource):
    """PyTorch tensors seen as Flax params through the name table (conversion/layout.py).

    Construction checks every name and shape against `cfg` from the file headers alone; a tensor
    is read when one of its slices is asked for (the last one stays cached: the release layout
    keeps several slices in one tensor).
    """

    def __init__(self, cfg: ModelConfig, files: dict[str, tuple[SafetensorsReader, str]], *, source: str):
        from flax import nnx

        from tttjax.model.moshi import abstract_model

        self.cfg, self._files = cfg, files
        table = layout.rows(cfg, layout.detect_layout(files))
        abstract = {tuple(str(k) for k in p): tuple(v.shape)
                    for p, v in nnx.to_flat_state(nnx.state(abstract_model(cfg)))}
        shapes = {k: tuple(r.shape(n)) for k, (r, n) in files.items()}
        expected = {r.name for r in table}
        problems = []
        if missing := [r.name for r in table if r.name not in files]:
            problems.append(f"missing keys {missing}")
        if unexpected := sorted(k for k in files if k not in expected):
            problems.append(f"unexpected keys {unexpected}")
        if wrong := [f"{r.name} {shapes[r.name]} (expected {r.torch_shape(abstract[r.path])})"
                     for r in table if r.name in files and shapes[r.name] != r.torch_shape(abstract[r.path])]:
            problems.append(f"wrong shapes {wrong}")
        if problems:
            raise ConversionError(f"{source} does not match its config: " + "; ".join(problems))
        self._slices = {(r.path, idx): (r, part) for r in table for part, idx in enumerate(r.index)}
        self._indices: dict = {}
        self.specs = {}
        for r in table:
            self._indices.setdefault(r.path, []).extend(r.index)
            reader, name = files[r.name]
            self.specs.setdefault(r.path, (abstract[r.path], reader.dtype(name)))
        self._cached: tuple[str | None, np.ndarray | None] = (None, None)

    def indices(self, path):
        return self._indices[path]

    def read(self, path, index=()):
        row, part = self._slices[(path, tuple(index))]
        if self._cached[0] != row.name:
            reader, name = self._files[row.name]
            self._cached = (row.name, reader.read(name))
        return row.from_torch(self._cached[1])[part][1]


def open_pytorch(weights: str | Path, config: str | Path, lora: str | Path | None = None,
                 param_dtype: str = "auto", **overrides) -> TorchSource:
    """PyTorch files + their config.json -> a checked TorchSource (`.cfg` is the model config)."""
    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found")
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{config}: invalid JSON ({e})") from None
    files = open_files(weights, lora)
    if not files:
        raise ConversionError(f"{weights} holds no tensors")
    if param_dtype == "auto":
        reader, name = next(iter(files.values()))
        param_dtype = "bfloat16" if reader.dtype(name).name == "bfloat16" else "float32"
    cfg = from_config_json(data, source=str(config), lora_rank=infer_lora_rank(files),
                           param_dtype=param_dtype, dtype=overrides.pop("dtype", param_dtype), **overrides)
    if data.get("lora") and cfg.lora_rank == 0:
        print(f"note: {config} says lora=true but no LoRA tensors were given; importing the base model",
              file=sys.stderr)
    return TorchSource(cfg, files, source=str(weights))


def load_pytorch(weights: str | Path, config: str | Path, lora: str | Path | None = None,
                 param_dtype: str = "auto", **overrides):
    """PyTorch files -> MoshiLM on the default device, tensor by tensor (used by the CLI and tests)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tttjax.model.moshi import abstract_model

    source = open_pytorch(weights, config, lora, param_dtype, **overrides)
    graphdef, state = nnx.split(abstract_model(source.cfg))
    model = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), state))
    copy_into(model, source, source_name=str(weights))
    return model


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
