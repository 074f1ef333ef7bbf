"""Compile ahead of time for a TPU topology on any host (libtpu), and read what the compiler planned.

`topology(name)` accepts Cloud TPU names (`v5p-64`: the number after the dash counts TensorCores
for v4 / v5p and chips for v5e / v6e, as Cloud TPU names them) and shapes (`v5p:4x4x4`), and
returns abstract devices (`jax.experimental.topologies`, nothing allocated). From a compiled
program (`jax.stages.Compiled`) it reads the FLOPs (`cost_analysis`) and the collectives of the
optimized HLO, counted per executed step (ops inside loops count their trip counts; hlo.py), by
kind, with the mesh axes each runs over and whether it crosses TPU slices (DCN). The chips' figures
(HBM, bandwidths, peaks): chips.py. Memory figures: `memory.compiled_figures`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re

import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh

from tttjax.analysis import chips, hlo
from tttjax.analysis.hlo import COLLECTIVES
from tttjax.errors import ConfigError, UserError

GiB = 1024 ** 3

GENERATIONS = ("v4", "v5e", "v5p", "v6e")  # TPU chips of chips.CHIPS, the one table of their figures
# Names whose number counts TensorCores (2 per chip), not chips.
_CORES_IN_NAME = ("v4", "v5p")
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}
# Chips -> torus shape as Cloud TPU slices come (3-D for v4 / v5p, 2-D for v5e / v6e).
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
FORMS = ("a Cloud TPU name (v5e-16, v5p-64, v6e-8, v4-32), <gen>:<shape> (v5e:4x4, v5p:2x2x1) or a GPU node "
         "(h100-8, h200-8; --num_slices nodes)")
GPUS = ("h100", "h200")  # NVIDIA GPUs compiled for without a device: the CUDA plugin and a target config
# The CUDA plugin wheels `tttjax.compile --topology=h100-8` needs (no GPU, no CUDA libraries: ~180 MB).
GPU_PLUGIN = "pip install --no-deps jax-cuda12-plugin==<the installed jax> jax-cuda12-pjrt==<the installed jax>"


def gpu_target_config(chip: chips.Chip, description: str) -> str:
    """XLA's GpuTargetConfigProto (text) of a Hopper GPU, as `get_topology_for_devices(...).target_config`
    prints it on one (xla/tools/hlo_opt/gpu_specs/ keeps such specs): compute capability 9.0, 132 SMs,
    228 KiB of shared memory per SM, 50 MiB of L2; memory size and bandwidth from the chip table."""
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_bw)} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {int(chip.hbm_bytes)} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }} registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{description}"
"""


_GPU_NAMES = {"h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200"}


def cuda_plugin_installed() -> bool:
    return importlib.util.find_spec("jax_plugins") is not None and \
        importlib.util.find_spec("jax_plugins.xla_cuda12") is not None


@dataclasses.dataclass(frozen=True)
class Topology:
    generation: str  # v4 | v5e | v5p | v6e | h100 | h200
    shape: str  # chips per dimension, e.g. 4x4x4 (a GPU node: its GPUs, "8")
    num_slices: int = 1  # TPU slices over DCN, or GPU nodes

    @property
    def platform(self) -> str:
        return "gpu" if self.generation in GPUS else "tpu"

    @property
    def chips(self) -> int:
        return math.prod(int(s) for s in self.shape.split("x")) * self.num_slices

    @property
    def name(self) -> str:
        per_slice = self.chips // self.num_slices * (2 if self.generation in _CORES_IN_NAME else 1)
        return f"{self.num_slices} x " * (self.num_slices > 1) + f"{self.generation}-{per_slice}"

    def devices(self) -> list:
        """The topology's abstract devices; UserError where libtpu (the CUDA plugin) is missing or
        libtpu is held by another process."""
        if self.platform == "gpu":
            if not cuda_plugin_installed():
                raise UserError(f"compiling for {self.generation} needs JAX's CUDA plugin: {GPU_PLUGIN}")
            config = gpu_target_config(self.chip, _GPU_NAMES[self.generation])
            return list(topologies.get_topology_desc(platform="cuda", target_config=config,
                                                     topology=f"1x{self.num_slices}x{self.shape}").devices)
        if importlib.util.find_spec("libtpu") is None:
            raise UserError("compiling for TPU needs libtpu: pip install \"jax[tpu]==<the installed jax version>\"")
        kwargs = {"num_slices": self.num_slices} if self.num_slices > 1 else {}
        try:
            return list(topologies.get_topology_desc(topology_name=f"{self.generation}:{self.shape}", platform="tpu",
                                                     **kwargs).devices)
        except Exception as e:  # XlaRuntimeError has no stable import path
            if "libtpu_lockfile" in str(e):
                raise UserError("another process holds libtpu (/tmp/libtpu_lockfile): wait for it to end, or set "
                                "ALLOW_MULTIPLE_LIBTPU_LOAD=1 to compile beside it") from None
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"libtpu cannot build the topology {self.generation}:{self.shape} ({first}); "
                              f"{self.generation} slices: {slice_shapes(self.generation)}") from None

    def hbm_per_device(self, num_devices: int) -> int:
        return self.chip.hbm_bytes * self.chips // num_devices

    @property
    def chip(self) -> chips.Chip:
        return chips.CHIPS[self.generation]

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.shape.split("x"))


def slice_shapes(generation: str) -> str:
    """The slice shapes of a generation with their Cloud TPU names: `2x2 (v5e-4), 2x4 (v5e-8), ...`."""
    cores = generation in _CORES_IN_NAME
    shapes = _SHAPES_3D if cores else _SHAPES_2D
    return ", ".join(f"{shape} ({generation}-{chips * (2 if cores else 1)})" for chips, shape in shapes.items())


def topology(name: str, num_slices: int = 1) -> Topology:
    """`v5p-64`, `v5p:4x4x4` or `h100-8` (num_slices of them); ConfigError (a usage error) naming the
    name and the accepted forms."""
    bad = ConfigError(f"unknown topology {name!r}: expected {FORMS}")
    if num_slices < 1:
        raise ConfigError(f"--num_slices={num_slices} must be >= 1")
    text = name.strip().lower()
    if ":" in text:
        gen, _, shape = text.partition(":")
        gen = _ALIASES.get(gen, gen)
        dims = shape.split("x")
        if gen not in GENERATIONS or not all(d.isdigit() and int(d) > 0 for d in dims) or \
                len(dims) != (3 if gen in _CORES_IN_NAME else 2):
            raise bad
        return Topology(gen, shape, num_slices)
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if not match:
        raise bad
    if match.group(1) in GPUS:
        if int(match.group(2)) not in (1, 2, 4, 8):
            raise ConfigError(f"{name!r}: a {match.group(1)} node has 1, 2, 4 or 8 GPUs (more nodes: --num_slices)")
        return Topology(match.group(1), match.group(2), num_slices)
    gen, count = _ALIASES.get(match.group(1), match.group(1)), int(match.group(2))
    if gen not in GENERATIONS:
        raise bad
    chips = count // 2 if gen in _CORES_IN_NAME else count
    shapes = _SHAPES_3D if gen in _CORES_IN_NAME else _SHAPES_2D
    if chips not in shapes or (gen in _CORES_IN_NAME and count % 2):
        raise ConfigError(f"{name!r}: no {gen} slice of that size (sizes: "
                         f"{', '.join(f'{gen}-{c * (2 if gen in _CORES_IN_NAME else 1)}' for c in shapes)})")
    return Topology(gen, shapes[chips], num_slices)


# ----------------------------------------------------------------------------------------------
# The collectives of an optimized HLO (hlo.py walks it)


def group_axes(groups: list[list[int]], mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes along which the members of a collective's groups differ."""
    varying = set()
    for group in groups:
        coords = np.array([np.unravel_index(i, mesh.devices.shape) for i in group if i < mesh.devices.size])
        if len(coords) > 1:
            varying |= {mesh.axis_names[a] for a in range(coords.shape[1]) if len(set(coords[:, a])) > 1}
    return tuple(a for a in mesh.axis_names if a in varying)


def slice_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes along which the TPU slice changes: their collectives cross DCN."""
    slices = np.vectorize(lambda d: getattr(d, "slice_index", 0) or 0)(mesh.devices)
    return tuple(name for a, name in enumerate(mesh.axis_names) if (np.diff(slices, axis=a) != 0).any())


def crosses_slices(groups: list[list[int]], mesh: Mesh) -> bool:
    flat = mesh.devices.reshape(-1)
    return any(len({getattr(flat[i], "slice_index", 0) for i in g if i < flat.size}) > 1 for g in groups)


def collectives(text: str, mesh: Mesh) -> dict:
    """{kind: {count, bytes, by_axes: {"fsdp": {count, bytes}, ...}, dcn_count, dcn_bytes}} per step.

    bytes: the size of each op's result on one device (an all-gather's gathered array, a
    reduce-scatter's shard, a collective-permute's received buffer), summed over its executions
    (hlo.collective_ops: ops inside loops count their trip counts). A cross-slice transfer handed to
    the Megascale runtime counts over the mesh axes that change slice, all of it DCN.
    """
    out = {kind: {"count": 0, "bytes": 0, "by_axes": {}, "dcn_count": 0, "dcn_bytes": 0} for kind in COLLECTIVES}
    for c in hlo.collective_ops(hlo.parse(text), mesh.devices.size):
        if c.groups is None:
            axes, dcn = "+".join(slice_axes(mesh)) or "none", True
        else:
            axes, dcn = "+".join(group_axes(c.groups, mesh)) or "none", crosses_slices(c.groups, mesh)
        _add(out[c.kind], axes, c.times, c.bytes * c.times, dcn=dcn)
    return out


def _add(entry: dict, axes: str, count: int, nbytes: int, *, dcn: bool) -> None:
    entry["count"] += count
    entry["bytes"] += nbytes
    by = entry["by_axes"].setdefault(axes, {"count": 0, "bytes": 0})
    by["count"] += count
    by["bytes"] += nbytes
    if dcn:
        entry["dcn_count"] += count
        entry["dcn_bytes"] += nbytes


# ----------------------------------------------------------------------------------------------
# A compiled program's figures


def compiler_flops(compiled) -> float:
    """FLOPs of one execution on one device (XLA's cost analysis; kernels it cannot see, such as
    Pallas calls, are not counted)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))
