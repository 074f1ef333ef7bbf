"""Train state: which parameters train, fp32 master copies, sharded init, base weights, fingerprints.

The model's parameters are split by path into `trainable` (LoRA + TTT + gates, or everything
for full fine-tuning) and `frozen`. Trainable parameters live in fp32 (master copies, and so the
optimizer state is fp32) and are cast to `param_dtype` for the forward pass; frozen ones stay in
`param_dtype` and are never checkpointed by the train state (they are re-derived from
`moshi_paths` / the seed, and their fingerprint is checked on resume).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tttjax.model.config import ModelConfig, from_lm_kwargs, parse_ttt_layers
from tttjax.model.moshi import MoshiLM
from tttjax.sharding import state_shardings

Path_ = tuple[str, ...]


def is_lora(path: Path_) -> bool:
    return bool(path) and path[-1] in ("lora_a", "lora_b")


def is_ttt(path: Path_) -> bool:
    """TTT weights and their gates: everything under the model's `ttt` stack."""
    return bool(path) and path[0] == "ttt"


def trainable_filter(full_finetuning: bool):
    """nnx filter over (path, value): what the optimizer updates."""
    def keep(path, value) -> bool:
        path = tuple(str(p) for p in path)
        return full_finetuning or is_lora(path) or is_ttt(path)

    return keep


def model_config(config) -> ModelConfig:
    """The model described by the training config (`model` or moshi_paths.config_path, + lora/ttt)."""
    if config.moshi_paths.config_path:
        path = Path(config.moshi_paths.config_path)
        if not path.is_file():
            raise FileNotFoundError(f"moshi_paths.config_path: {path} not found")
        lm_kwargs = {k: v for k, v in json.loads(path.read_text()).items()
                     if k not in ("lora", "lora_rank", "lora_scaling", "ttt")}
        source = str(path)
    else:
        lm_kwargs, source = config.model.to_dict(), "config.model"
    ttt = config.ttt
    ttt_layers = parse_ttt_layers(ttt.layers, int(lm_kwargs["num_layers"])) if ttt.enable else ()
    return from_lm_kwargs(
        lm_kwargs, source=source,
        lora_rank=config.lora.rank if config.lora.enable else 0, lora_scaling=config.lora.scaling,
        ttt_layers=ttt_layers, ttt_num_heads=ttt.num_heads, ttt_base_lr=ttt.base_lr,
        ttt_mini_batch_size=ttt.mini_batch_size, ttt_initial_gating_alpha=ttt.initial_gating_alpha,
        ttt_causal=ttt.causal, ttt_scan_remat_group=ttt.scan_remat_group,
        param_dtype=config.param_dtype, dtype=config.dtype, remat=config.remat,
        unroll_layers=config.unroll_layers)


def init_model(cfg: ModelConfig, mesh, seed: int) -> MoshiLM:
    """A randomly initialised model whose params are created directly in their shardings."""
    from tttjax.model.moshi import abstract_model

    graphdef, abstract = nnx.split(abstract_model(cfg))
    shardings = state_shardings(abstract, mesh)

    def create():
        with nnx.use_eager_sharding(False):
            return nnx.state(MoshiLM(cfg, rngs=nnx.Rngs(seed)))

    create = jax.jit(create, out_shardings=shardings)
    return nnx.merge(graphdef, create())


def flat_params(model: nnx.Module) -> dict[Path_, jax.Array]:
    return {tuple(str(k) for k in path): v.get_value()
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def weights_source(path: str | Path, config_path: str | None):
    """A ParamSource (read lazily, slice by slice) over a PyTorch safetensors file, a tttjax model
    dir or a training step dir."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        from conversion.from_pytorch import open_pytorch

        if not config_path:
            raise ValueError(f"{path}: a PyTorch weights file needs moshi_paths.config_path (its config.json)")
        return open_pytorch(path, config_path)
    from tttjax.checkpoint.model_dir import open_checkpoint

    return open_checkpoint(path)[1]


def build_model(config, cfg: ModelConfig, mesh) -> MoshiLM:
    """The run's starting model: random init (seed), then the base weights of moshi_paths if set,
    streamed straight onto the mesh."""
    from conversion.sources import copy_into

    model = init_model(cfg, mesh, config.seed)
    source = config.moshi_paths.moshi_path
    if source:
        copy_into(model, weights_source(source, config.moshi_paths.config_path or None),
                  source_name=f"moshi_paths.moshi_path={source}", allow_missing=lambda p: is_lora(p) or is_ttt(p))
    return model


def fingerprint(frozen) -> dict:
    """A cheap description of the frozen params (paths, shapes, dtypes, sums) to detect a changed base.

    Sums are compared with a tolerance (`same_fingerprint`), since a different mesh reduces in a
    different order.
    """
    leaves = jax.tree_util.tree_flatten_with_path(frozen)[0]
    sums = jax.jit(lambda xs: [jnp.stack([jnp.sum(x.astype(jnp.float32)),
                                          jnp.sum(jnp.abs(x.astype(jnp.float32)))]) for x in xs])(
        [x for _, x in leaves])
    digest = hashlib.sha256()
    for path, x in leaves:
        digest.update(f"{jax.tree_util.keystr(path)}{x.shape}{x.dtype}".encode())
    totals = np.sum([np.asarray(s, np.float64) for s in sums], axis=0) if sums else np.zeros(2)
    return {"layout": digest.hexdigest()[:16], "sum": float(totals[0]), "abs_sum": float(totals[1])}


def same_fingerprint(saved: dict, current: dict, rtol: float = 1e-5) -> bool:
    return saved["layout"] == current["layout"] and all(
        abs(saved[k] - current[k]) <= rtol * max(abs(current[k]), 1e-12) for k in ("sum", "abs_sum"))
