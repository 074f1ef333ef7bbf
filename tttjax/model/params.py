"""The parameter tree by path: which params are LoRA / TTT / trainable, flat views, sharded init.

What trains is decided by path, never by substring: LoRA A/B everywhere, and everything under the
model's `ttt` stack (TTT weights and their gates), or every parameter for full fine-tuning.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from flax import nnx

from tttjax.model.config import ModelConfig
from tttjax.model.moshi import MoshiLM, abstract_model
from tttjax.parallel.sharding import state_shardings

Path_ = tuple[str, ...]


def is_lora(path: Path_) -> bool:
    return bool(path) and path[-1] in ("lora_a", "lora_b")


def is_ttt(path: Path_) -> bool:
    """TTT weights and their gates: everything under the model's `ttt` stack."""
    return bool(path) and path[0] == "ttt"


def is_adapter(path: Path_) -> bool:
    """A parameter that a base checkpoint may lack (fresh LoRA / TTT)."""
    return is_lora(path) or is_ttt(path)


def trainable(path: Path_, full_finetuning: bool) -> bool:
    return full_finetuning or is_adapter(path)


def trainable_filter(full_finetuning: bool):
    """nnx filter over (path, value): what the optimizer updates."""
    return lambda path, value: trainable(tuple(str(p) for p in path), full_finetuning)


def path_of(keys) -> Path_:
    """A parameter path as strings, from nnx state paths or jax tree paths (DictKey, SequenceKey)."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


def flat_params(model: nnx.Module) -> dict[Path_, jax.Array]:
    return {path_of(path): v.get_value() for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def flat_abstract(cfg: ModelConfig) -> dict[Path_, nnx.Variable]:
    """{path: abstract Variable} of a model of `cfg` (shapes, dtypes, sharding names; nothing allocated).
    Traced once per architecture (remat does not change the params): a layout search asks for it
    for every candidate, and each trace of the 7B takes seconds."""
    return dict(_flat_abstract(dataclasses.replace(cfg, remat="none")))


@functools.lru_cache(maxsize=8)
def _flat_abstract(cfg: ModelConfig) -> dict[Path_, nnx.Variable]:
    return {path_of(p): v for p, v in nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param))}


def model_shardings(abstract_state, mesh, *, full_finetuning: bool = False, frozen_drop: tuple[str, ...] = ()):
    """Shardings of a model's params: trainables by the rules, frozen ones without the mesh axes of
    `frozen_drop` (sharding.frozen_storage_drop)."""
    rules, dropped = state_shardings(abstract_state, mesh), state_shardings(abstract_state, mesh, frozen_drop)
    return jax.tree_util.tree_map_with_path(lambda p, a, b: a if trainable(path_of(p), full_finetuning) else b,
                                            rules, dropped)


def init_model(cfg: ModelConfig, mesh, seed: int, *, full_finetuning: bool = False,
               frozen_drop: tuple[str, ...] = ()) -> MoshiLM:
    """A randomly initialised model whose params are created directly in their shardings."""
    graphdef, abstract = nnx.split(abstract_model(cfg))
    shardings = model_shardings(abstract, mesh, full_finetuning=full_finetuning, frozen_drop=frozen_drop)

    def create():
        with nnx.use_eager_sharding(False):
            return nnx.state(MoshiLM(cfg, rngs=nnx.Rngs(seed)))

    return nnx.merge(graphdef, jax.jit(create, out_shardings=shardings)())
