"""A model directory: `DIR/config.json` (moshi LM config + lora + ttt) and `DIR/params/` (Orbax).

This is what `conversion.from_pytorch` writes and what `--checkpoint_dir` / `checkpoint.init_state_dir`
accept besides a training step directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

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
        ckptr.save(directory / PARAMS_DIR, params)
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
    """Build the model described by DIR/config.json (dtype overrides allowed) and restore its params."""
    cfg = read_config(directory, **overrides)
    graphdef, abstract_state = nnx.split(abstract_model(cfg))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(abstract_state))
    nnx.replace_by_pure_dict(abstract_state, restore_params(directory, target))
    return nnx.merge(graphdef, abstract_state)
