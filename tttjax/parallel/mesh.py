"""The (data, fsdp, tensor) device mesh from the config's `mesh.*` sizes (docs/distributed.md).

`mesh.data`, `mesh.fsdp`, `mesh.tensor` give the axis sizes (-1 = the remaining devices). With
`mesh.dcn_*` left at 1 they span all devices. Multi-slice TPU (and GPU clusters, one granule per
process) split each axis into a fast inner part (ICI: `mesh.data` ..., per slice) and an outer part
over the data-centre network (`mesh.dcn_data` ..., -1 = the remaining slices); the axis size is
their product (MaxText's ici_* / dcn_* parallelism). The devices may be abstract (a TPU topology
compiled for on a CPU host, `tttjax.compile`): nothing here touches them.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from tttjax.errors import UserError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")


def _resolve(sizes: list[int], total: int, what: str) -> tuple[int, ...]:
    named = dict(zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1:
        raise UserError(f"mesh {what} {named}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"mesh {what} {named}: sizes must be >= 1 or -1")
    known = math.prod(s for s in sizes if s != -1)
    if total % known:
        raise UserError(f"mesh {what} {named} does not fit {total}")
    sizes = [total // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != total:
        raise UserError(f"mesh {what} {named} uses {math.prod(sizes)} of {total}")
    return tuple(sizes)


def resolve_mesh(spec: Mapping, num_devices: int, num_granules: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ici_shape, dcn_shape) of `mesh.{data,fsdp,tensor}` and `mesh.dcn_*` (-1 = the rest).

    With every dcn size 1, the ICI shape spans all `num_devices` (granules are ignored);
    otherwise the dcn shape spans the `num_granules` slices (or processes) and the ICI shape the
    devices of one of them.
    """
    dcn = [int(spec.get(f"dcn_{axis}", 1)) for axis in MESH_AXES]
    ici = [int(spec.get(axis, 1)) for axis in MESH_AXES]
    if all(s == 1 for s in dcn):
        return _resolve(ici, num_devices, "devices"), (1, 1, 1)
    if num_devices % num_granules:
        raise UserError(f"{num_devices} devices do not split evenly over {num_granules} slices/processes")
    return (_resolve(ici, num_devices // num_granules, f"per slice ({num_devices // num_granules} devices)"),
            _resolve(dcn, num_granules, f"dcn ({num_granules} slices/processes)"))


def granules(devices) -> tuple[int, bool]:
    """(number of TPU slices or of processes, whether the granule is the process)."""
    if devices[0].platform == "tpu":
        slices = {getattr(d, "slice_index", 0) for d in devices}
        return len(slices), False
    return len({d.process_index for d in devices}), True


def make_mesh(spec: Mapping, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh of `spec` over `devices` (default: all), axes of type Auto."""
    devices = list(jax.devices() if devices is None else devices)
    num_granules, process_granule = granules(devices)
    ici, dcn = resolve_mesh(spec, len(devices), num_granules)
    if math.prod(dcn) > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=process_granule)
    else:
        if num_granules > 1 and not process_granule and ici[1] * ici[2] > len(devices) // num_granules:
            log.warning("mesh %s: fsdp/tensor span %d TPU slices over DCN; set mesh.dcn_data=-1 to keep "
                        "them inside a slice", dict(zip(MESH_AXES, ici)), num_granules)
        if devices[0].platform == "tpu":  # physical-topology-aware order (ICI rings)
            try:
                grid = mesh_utils.create_device_mesh(ici, devices)
            except NotImplementedError:  # an axis (tensor=2 on a 4x4 slice) that no set of torus axes makes
                grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
        else:  # process-major order: each process holds a contiguous block of every axis
            grid = np.asarray(devices).reshape(ici)
    return Mesh(grid, MESH_AXES)
