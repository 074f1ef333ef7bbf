"""Weights-only restore for `checkpoint.init_state_dir`: fresh optimizer, step 0."""

from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp

from tttjax.checkpoint.manager import STATE

PARAMS_DIR = "params"


def restore_params(path, abstract_params, *, key: str = "params"):
    """Restores params onto the shardings of `abstract_params` from either

    * an imported checkpoint dir `DIR/params/` (a StandardCheckpointer pytree of params), or
    * a training step dir `checkpoint_NNNNNN/state/`, taking only its `state[key]` subtree.
    """
    path = Path(path)
    if (path / PARAMS_DIR).is_dir():
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path / PARAMS_DIR, abstract_params)
    if (path / STATE).is_dir():
        target = {key: abstract_params}
        args = ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        )
        with ocp.PyTreeCheckpointer() as ckptr:
            return ckptr.restore(path / STATE, args=args)[key]
    raise FileNotFoundError(f"{path}: has neither {PARAMS_DIR}/ (imported weights) nor {STATE}/ (a step dir)")
