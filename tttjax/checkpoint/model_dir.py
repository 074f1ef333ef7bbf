"""Write a model directory: `DIR/config.json` (moshi LM config + lora + ttt) and `DIR/params/` (Orbax).

This is what `conversion.from_pytorch` writes; `tttjax.weights.open_weights` reads it back, as it
reads a training step directory.
"""

from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp
from flax import nnx

from tttjax.checkpoint.manager import storage_save_args
from tttjax.model.config import to_config_json
from tttjax.model.moshi import MoshiLM
from tttjax.rundir import PARAMS_DIR, write_config_json


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
    write_config_json(directory, to_config_json(model.cfg))
