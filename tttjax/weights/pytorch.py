"""PyTorch (moshi) safetensors files seen as a parameter source, through the name table.

Accepts the moshi in-memory layout (`in_projs.N`, what moshi-finetune writes) and the released
fused layout (`in_proj_weight`), LoRA tensors in the weights file or in a separate LoRA file,
and TTT tensors (docs/contract.md §7) with a `"ttt"` block in config.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from tttjax.errors import UserError
from tttjax.model.config import ModelConfig, from_config_json
from tttjax.model.moshi import MoshiLM
from tttjax.model.params import flat_abstract
from tttjax.rundir import read_json
from tttjax.weights import layout
from tttjax.weights.safetensors_io import SafetensorsReader
from tttjax.weights.sources import ParamSource, materialize

# Keys that PyTorch TTT-Moshi checkpoints carry and that have no meaning here.
_IGNORED_MARKERS = ("backward_ssm_gating", "original_layer")


class ConversionError(UserError):
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
    """PyTorch tensors seen as Flax params through the name table (tttjax/weights/layout.py).

    Construction checks every name, shape and dtype against `cfg` from the file headers alone; a tensor
    is read when one of its slices is asked for (the last one stays cached: the release layout
    keeps several slices in one tensor).
    """

    def __init__(self, cfg: ModelConfig, files: dict[str, tuple[SafetensorsReader, str]], *, source: str):
        self.cfg, self._files = cfg, files
        table = layout.rows(cfg, layout.detect_layout(files))
        params = flat_abstract(cfg)
        abstract = {p: tuple(v.shape) for p, v in params.items()}
        shapes = {k: tuple(r.shape(n)) for k, (r, n) in files.items()}
        dtypes = {k: r.dtype(n) for k, (r, n) in files.items()}
        expected = {r.name for r in table}
        problems = []
        if missing := [r.name for r in table if r.name not in files]:
            problems.append(f"missing keys {missing}")
        if unexpected := sorted(k for k in files if k not in expected):
            problems.append(f"unexpected keys {unexpected}")
        if wrong := [f"{r.name} {shapes[r.name]} (expected {r.torch_shape(abstract[r.path])})"
                     for r in table if r.name in files and shapes[r.name] != r.torch_shape(abstract[r.path])]:
            problems.append(f"wrong shapes {wrong}")
        if not_float := [f"{r.name} {dtypes[r.name]}" for r in table if r.name in files
                         and jnp.issubdtype(params[r.path].dtype, jnp.floating)
                         and not jnp.issubdtype(dtypes[r.name], jnp.floating)]:
            problems.append(f"non-floating dtypes where the model holds floats {not_float}")
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
    data = read_json(config)
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
                 param_dtype: str = "auto", **overrides) -> MoshiLM:
    """PyTorch files -> MoshiLM on the default device, tensor by tensor (used by the CLI and tests)."""
    source = open_pytorch(weights, config, lora, param_dtype, **overrides)
    return materialize(source.cfg, source, source_name=str(weights))
