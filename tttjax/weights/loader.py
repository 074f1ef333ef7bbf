"""Open any weights path: a training step dir, a tttjax model dir or a PyTorch .safetensors file.

`open_weights` says which kind it was (`rundir.weights_kind`), builds the model config it
describes and a `ParamSource` that reads the params lazily, slice by slice; `load_model` puts
them into a model. Every CLI and the trainer's `moshi_paths` / `init_state_dir` go through here.

A step dir's trained params come from its state; the frozen rest from the run's
`moshi_paths.moshi_path` (opened the same way), or, for a run that started from random weights,
from re-running its seeded initialisation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections
import numpy as np

from tttjax import rundir
from tttjax.config import reader
from tttjax.errors import UserError
from tttjax.model.config import ModelConfig, from_config_json, from_run_config, validate
from tttjax.model.moshi import MoshiLM
from tttjax.model.params import flat_abstract, init_model
from tttjax.parallel.mesh import make_mesh
from tttjax.weights.pytorch import open_pytorch
from tttjax.weights.sources import (
    LayeredSource,
    ModelSource,
    OrbaxSource,
    ParamSource,
    materialize,
)


@dataclasses.dataclass
class Weights:
    path: Path
    kind: str  # rundir.STEP | rundir.MODEL | rundir.PYTORCH
    cfg: ModelConfig
    source: ParamSource
    run_config: ml_collections.ConfigDict | None = None  # a step dir's run (its args.yaml)


def open_weights(path, config_path: str | Path | None = None, **overrides) -> Weights:
    """The weights at `path`; `config_path` is the moshi config.json a PyTorch file needs.

    `overrides` change ModelConfig fields that do not alter the parameters (dtype, remat). A relative
    path is taken from the current directory (Orbax itself wants absolute ones).
    """
    path = Path(path).absolute()
    kind = rundir.weights_kind(path)
    if kind == rundir.PYTORCH:
        if not config_path:
            raise UserError(f"{path}: a PyTorch weights file needs its config.json (moshi_paths.config_path)")
        source = open_pytorch(path, config_path, **overrides)
        return Weights(path, kind, source.cfg, source)
    if kind == rundir.MODEL:
        source = OrbaxSource(path / rundir.PARAMS_DIR)
        overrides.setdefault("param_dtype", str(next(iter(source.specs.values()))[1]))
        cfg = from_config_json(rundir.read_json(path / rundir.CONFIG_FILE), source=str(path / rundir.CONFIG_FILE),
                               **overrides)
        return Weights(path, kind, cfg, source)
    run = reader.read_step_config(path)
    cfg = validate(dataclasses.replace(from_run_config(run), **overrides))
    trained = OrbaxSource(path / rundir.STATE, prefix=("params",))
    if run.full_finetuning:
        return Weights(path, kind, cfg, trained, run)

    def open_base() -> ParamSource:
        base = run.moshi_paths.moshi_path
        if base:
            return open_weights(base, run.moshi_paths.config_path or None).source
        return ModelSource(init_model(cfg, make_mesh({"data": -1}), run.seed))

    specs = {p: (tuple(v.shape), np.dtype(v.dtype)) for p, v in flat_abstract(cfg).items()}
    return Weights(path, kind, cfg, LayeredSource(trained, specs, open_base), run)


def load_model(path, config_path: str | Path | None = None, **overrides) -> MoshiLM:
    """The model at any weights path, on the default device (see `open_weights`)."""
    weights = open_weights(path, config_path, **overrides)
    return materialize(weights.cfg, weights.source, source_name=str(path))
