"""Where parameter values come from, one slice at a time: Orbax checkpoints, a live model, or both.

A source knows the Flax path, shape and dtype of every param it holds and reads `param[index]`
for a prefix `index` (a layer, a (layer, step) pair, or `()` for all of it). Import and export
walk params slice by slice through this interface, so host memory holds one slice, never the
model. The PyTorch-file source lives in `tttjax.weights.pytorch` (it needs the name table);
`tttjax.weights.open_weights` picks the source for any weights path.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from tttjax.errors import UserError
from tttjax.model.moshi import MoshiLM, abstract_model
from tttjax.model.params import Path_, flat_params, path_of
from tttjax.rundir import error_summary

Index = tuple[int, ...]
SLICE_BYTES = 64 << 20  # params larger than this are read in 2-D slices (one layer's matrix)


def slice_indices(shape: tuple[int, ...], itemsize: int) -> list[Index]:
    """Prefix indices that cut a param into its trailing 2-D matrices, or [()] if it is small."""
    if math.prod(shape) * itemsize <= SLICE_BYTES or len(shape) <= 2:
        return [()]
    return [tuple(int(i) for i in idx) for idx in np.ndindex(*shape[:-2])]


class ParamSource:
    """`specs`: {path: (shape, dtype)}; subclasses implement `read`."""

    specs: dict[Path_, tuple[tuple[int, ...], np.dtype]]

    def read(self, path: Path_, index: Index = ()) -> np.ndarray:
        raise NotImplementedError

    def indices(self, path: Path_) -> list[Index]:
        """The slices this source reads `path` in, covering the whole param."""
        shape, dtype = self.specs[path]
        return slice_indices(shape, np.dtype(dtype).itemsize)


class OrbaxSource(ParamSource):
    """Params in an Orbax pytree checkpoint, read slice by slice with TensorStore.

    Checkpoints written by tttjax store every matrix of a stacked param as its own chunk
    (`storage_save_args`), so reading one layer reads only that layer's bytes.
    """

    def __init__(self, directory: str | Path, prefix: Path_ = ()):
        self.directory = Path(directory).absolute()
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)  # Orbax warns that an item dir has no step-level metadata file
        try:
            with ocp.StandardCheckpointer() as ckptr:
                tree = ckptr.metadata(self.directory).item_metadata
        except Exception as e:  # Orbax raises many types for a damaged or missing directory
            raise UserError(f"{self.directory}: unreadable checkpoint metadata ({error_summary(e)})") from None
        finally:
            absl.setLevel(level)
        self.specs, self._names = {}, {}
        for keys, meta in jax.tree_util.tree_flatten_with_path(tree)[0]:
            path = path_of(keys)
            if path[:len(prefix)] == prefix:
                self.specs[path[len(prefix):]] = (tuple(meta.shape), np.dtype(meta.dtype))
                self._names[path[len(prefix):]] = ".".join(path)
        if not self.specs:
            raise UserError(f"{self.directory}: no params under {'.'.join(prefix) or 'the root'}")

    @functools.lru_cache(maxsize=None)
    def _array(self, path: Path_):
        kvstore = {"driver": "ocdbt", "base": f"file://{self.directory}", "path": self._names[path]}
        try:
            return ts.open({"driver": "zarr", "kvstore": kvstore}, read=True).result()
        except ValueError:  # checkpoints saved with use_zarr3
            return ts.open({"driver": "zarr3", "kvstore": kvstore}, read=True).result()

    def read(self, path: Path_, index: Index = ()) -> np.ndarray:
        try:
            return np.asarray(self._array(path)[index].read().result())
        except Exception as e:  # TensorStore: truncated, missing or corrupt data files
            raise UserError(f"{self.directory}: cannot read {self._names[path]} ({error_summary(e)})") from None


class ModelSource(ParamSource):
    """The params of a live (possibly multi-host sharded) model; each slice is gathered once.

    With several processes every process must read the same slices in the same order (the
    gather is a collective); each then holds the slice.
    """

    def __init__(self, model: nnx.Module):
        self._flat = flat_params(model)
        self.specs = {p: (tuple(v.shape), np.dtype(v.dtype)) for p, v in self._flat.items()}

    def read(self, path: Path_, index: Index = ()) -> np.ndarray:
        value = self._flat[path]
        if value.is_fully_addressable:
            return np.asarray(value[index] if index else value)
        gathered = _take(value, *index, out_sharding=NamedSharding(value.sharding.mesh, PartitionSpec()))
        return np.asarray(gathered.addressable_data(0))


@functools.partial(jax.jit, static_argnames="out_sharding")
def _take(value, *index, out_sharding):
    return jax.lax.with_sharding_constraint(value[tuple(index)] if index else value, out_sharding)


class LayeredSource(ParamSource):
    """`top`'s params over a base: a run's trained params over the weights it started from.

    The base is opened (`open_base()`) only when one of its params is read, so an adapters-only
    export of a step never needs the base weights; `base_specs` stands in for its specs until then.
    """

    def __init__(self, top: ParamSource, base_specs: dict, open_base):
        self.top, self._open_base, self._base = top, open_base, None
        self.specs = {**base_specs, **top.specs}

    def _source(self, path: Path_) -> ParamSource:
        if path in self.top.specs:
            return self.top
        if self._base is None:
            self._base = self._open_base()
        return self._base

    def read(self, path: Path_, index: Index = ()) -> np.ndarray:
        return self._source(path).read(path, index)

    def indices(self, path: Path_) -> list[Index]:
        return self._source(path).indices(path)


def fill(params: dict[Path_, jax.Array], source: ParamSource, *, source_name: str,
         allow_missing=lambda path: False) -> dict[Path_, jax.Array]:
    """`params` ({path: array}) with `source`'s values, slice by slice, keeping each array's dtype and
    sharding: each slice goes straight onto the mesh (every process places its own shards).

    Params absent from the source must satisfy `allow_missing` (fresh LoRA / TTT); params of the
    source absent from `params`, and shape mismatches, are errors naming the path.
    """
    extra = sorted(".".join(p) for p in source.specs if p not in params)
    missing = sorted(".".join(p) for p in params if p not in source.specs and not allow_missing(p))
    shapes = [f"{'.'.join(p)} {source.specs[p][0]} vs model {tuple(v.shape)}"
              for p, v in params.items() if p in source.specs and source.specs[p][0] != tuple(v.shape)]
    problems = ([f"not in the model: {extra}"] if extra else []) + \
               ([f"missing: {missing}"] if missing else []) + ([f"shape mismatch: {shapes}"] if shapes else [])
    if problems:
        raise UserError(f"{source_name} does not fit the model: " + "; ".join(problems))
    out = dict(params)
    for path, param in params.items():
        if path not in source.specs:
            continue
        for index in source.indices(path):
            value = source.read(path, index).astype(param.dtype, copy=False)
            if not index:
                param = _place(value, param.sharding)
            else:
                param = _set_slice(param, _place(value, _drop_leading(param.sharding, len(index))),
                                   *np.asarray(index, np.int32))
        out[path] = param
    return out


def copy_into(model: nnx.Module, source: ParamSource, *, source_name: str,
              allow_missing=lambda path: False) -> None:
    """Overwrite `model`'s params with `source`'s (see `fill`), in place."""
    state = nnx.state(model, nnx.Param)
    variables = {path_of(p): v for p, v in nnx.to_flat_state(state)}
    values = fill({p: v.get_value() for p, v in variables.items()}, source, source_name=source_name,
                  allow_missing=allow_missing)
    for path, variable in variables.items():
        variable.set_value(values[path])
    nnx.update(model, state)


def materialize(cfg, source: ParamSource, *, source_name: str) -> MoshiLM:
    """A model of `cfg` on the default device holding `source`'s params (which must cover them all)."""
    graphdef, state = nnx.split(abstract_model(cfg))
    model = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), state))
    copy_into(model, source, source_name=source_name)
    return model


def _place(value: np.ndarray, sharding) -> jax.Array:
    """A host array onto `sharding`; each process supplies its addressable shards."""
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def _drop_leading(sharding, n: int):
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[n:]))
    return sharding


@functools.partial(jax.jit, donate_argnums=0)
def _set_slice(param, value, *index):
    """param[index] = value in place (the param's buffer is donated)."""
    starts = tuple(index) + (0,) * (param.ndim - len(index))
    return lax.dynamic_update_slice(param, value.reshape((1,) * len(index) + value.shape), starts)
