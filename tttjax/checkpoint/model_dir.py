"""A model directory: `DIR/config.json` (moshi LM config + lora + ttt) and `DIR/params/` (Orbax).

This is what `conversion.from_pytorch` writes and what `--checkpoint_dir` / `checkpoint.init_state_dir`
accept besides a training step directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from tttjax.checkpoint.manager import STATE, storage_save_args
from tttjax.checkpoint.params import PARAMS_DIR, restore_params
from tttjax.model.config import ModelConfig, from_config_json, to_config_json
from tttjax.model.moshi import MoshiLM, abstract_model

CONFIG_FILE = "config.json"


def save_model(directory: str | Path, model: MoshiLM) -> None:
    """Write config.json and the params; refuses to overwrite an existing checkpoint."""
    directory = Path(directory).absolute()
    if (directory / PARAMS_DIR).exists():
        raise FileExistsError(f"{directory / PARAMS_DIR} already exists; choose a new --out directory")
    directory.mkdir(parents=True, exist_ok=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / PARAMS_DIR, params, save_args=storage_save_args(params))
        ckptr.wait_until_finished()
    (directory / CONFIG_FILE).write_text(json.dumps(to_config_json(model.cfg), indent=4, sort_keys=True))


def read_config(directory: str | Path, **overrides) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a tttjax checkpoint directory")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    return from_config_json(data, source=str(path), **overrides)


def load_model(directory: str | Path, **overrides) -> MoshiLM:
    """A model from an imported dir (config.json + params/) or a training step dir (state/).

    `overrides` change ModelConfig fields that do not alter the parameters (dtype, remat).
    """
    directory = Path(directory)
    if (directory / STATE).is_dir():
        return _load_step(directory, **overrides)
    cfg, _ = checkpoint_config(directory, **overrides)
    graphdef, abstract_state = nnx.split(abstract_model(cfg))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(abstract_state))
    nnx.replace_by_pure_dict(abstract_state, restore_params(directory, target))
    return nnx.merge(graphdef, abstract_state)


def _stored_param_dtype(path: Path) -> str:
    """The dtype the params were saved in (config.json, moshi's format, does not record it)."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found: not a tttjax checkpoint directory")
    with ocp.StandardCheckpointer() as ckptr:
        leaves = jax.tree.leaves(ckptr.metadata(path).item_metadata)
    return str(leaves[0].dtype) if leaves else "float32"


def _run_config(step_dir: Path):
    """The resolved config (args.yaml) of the run a step dir belongs to."""
    import ml_collections
    import yaml

    args = step_dir.absolute().parent.parent / "args.yaml"
    if not args.is_file():
        raise FileNotFoundError(f"{args} not found: {step_dir} is not a step dir of a tttjax run")
    return ml_collections.ConfigDict(yaml.safe_load(args.read_text()))


def checkpoint_config(directory: str | Path, **overrides) -> tuple[ModelConfig, str]:
    """(ModelConfig, "step" | "imported") of a step dir or an imported dir, without reading params."""
    import dataclasses

    from tttjax.model.config import validate
    from tttjax.train import state as state_lib

    directory = Path(directory)
    if (directory / STATE).is_dir():
        cfg = state_lib.model_config(_run_config(directory))
        return validate(dataclasses.replace(cfg, **overrides)), "step"
    if (directory / CONFIG_FILE).is_file():
        overrides.setdefault("param_dtype", _stored_param_dtype(directory / PARAMS_DIR))
        return read_config(directory, **overrides), "imported"
    if not directory.exists():
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    raise FileNotFoundError(f"{directory}: neither a training step dir ({STATE}/) nor an imported checkpoint "
                            f"({CONFIG_FILE} + {PARAMS_DIR}/)")


def open_checkpoint(directory: str | Path):
    """(ModelConfig, ParamSource) for an imported dir or a step dir, reading params lazily.

    A step dir's trained params come from its state; the frozen rest from the run's
    `moshi_paths.moshi_path` (a PyTorch file or another checkpoint dir), or, for a run that
    started from random weights, from re-running its seeded initialisation.
    """
    from conversion.sources import LayeredSource, ModelSource, OrbaxSource

    directory = Path(directory)
    cfg, kind = checkpoint_config(directory)
    if kind == "imported":
        return cfg, OrbaxSource(directory / PARAMS_DIR)
    config = _run_config(directory)
    trained = OrbaxSource(directory / STATE, prefix=("params",))
    if config.full_finetuning:
        return cfg, trained

    def open_base():
        if config.moshi_paths.moshi_path:
            from tttjax.train.state import weights_source

            return weights_source(config.moshi_paths.moshi_path, config.moshi_paths.config_path or None)
        from tttjax.sharding import make_mesh
        from tttjax.train.state import init_model

        return ModelSource(init_model(cfg, make_mesh({"data": -1}), config.seed))

    abstract = {tuple(str(k) for k in p): (tuple(v.shape), np.dtype(v.dtype))
                for p, v in nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param))}
    return cfg, LayeredSource(trained, abstract, open_base)


def _load_step(step_dir: Path, **overrides) -> MoshiLM:
    """Rebuild a run's model exactly: its config (args.yaml), base weights, then the saved trainables."""
    import jax.numpy as jnp

    from tttjax.sharding import make_mesh
    from tttjax.train import state as state_lib

    config = _run_config(step_dir)
    cfg, _ = checkpoint_config(step_dir, **overrides)
    model = state_lib.build_model(config, cfg, make_mesh({"data": -1}))
    graphdef, trainable, frozen = nnx.split(model, state_lib.trainable_filter(config.full_finetuning), ...)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding),
                          nnx.to_pure_dict(trainable))
    params = restore_params(step_dir, target)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(cfg.jnp_param_dtype), params), frozen)
