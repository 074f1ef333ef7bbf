"""Compile ahead of time for a TPU topology on any host (libtpu), and read what the compiler planned.

`topology(name)` accepts Cloud TPU names (`v5p-64`: the number after the dash counts TensorCores
for v4 / v5p and chips for v5e / v6e, as Cloud TPU names them) and shapes (`v5p:4x4x4`), and
returns abstract devices (`jax.experimental.topologies`, nothing allocated). From a compiled
program (`jax.stages.Compiled`) it reads the FLOPs (`cost_analysis`) and the collectives of the
optimized HLO, counted per executed step (ops inside loops count their trip counts), by kind, with
the mesh axes each runs over and whether it crosses TPU slices (DCN). Memory figures:
`memory.compiled_figures`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from collections import defaultdict

import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh

from tttjax.errors import ConfigError, UserError

GiB = 1024 ** 3

# HBM per chip (Cloud TPU system architecture pages, cloud.google.com/tpu/docs/<gen>:
# v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e (Trillium) 32 GiB).
HBM_PER_CHIP = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
HBM_SOURCE = {gen: f"{hbm // GiB} GiB per chip, cloud.google.com/tpu/docs/{gen}" for gen, hbm in HBM_PER_CHIP.items()}
# Names whose number counts TensorCores (2 per chip), not chips.
_CORES_IN_NAME = ("v4", "v5p")
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}
# Chips -> torus shape as Cloud TPU slices come (3-D for v4 / v5p, 2-D for v5e / v6e).
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
FORMS = "a Cloud TPU name (v5e-16, v5p-64, v6e-8, v4-32) or <gen>:<shape> (v5e:4x4, v5p:2x2x1)"
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Topology:
    generation: str  # v4 | v5e | v5p | v6e
    shape: str  # chips per dimension, e.g. 4x4x4
    num_slices: int = 1

    @property
    def chips(self) -> int:
        return math.prod(int(s) for s in self.shape.split("x")) * self.num_slices

    @property
    def name(self) -> str:
        per_slice = self.chips // self.num_slices * (2 if self.generation in _CORES_IN_NAME else 1)
        return f"{self.num_slices} x " * (self.num_slices > 1) + f"{self.generation}-{per_slice}"

    def devices(self) -> list:
        """The topology's abstract devices; ValueError where libtpu is missing or held by another process."""
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
        return HBM_PER_CHIP[self.generation] * self.chips // num_devices


def slice_shapes(generation: str) -> str:
    """The slice shapes of a generation with their Cloud TPU names: `2x2 (v5e-4), 2x4 (v5e-8), ...`."""
    cores = generation in _CORES_IN_NAME
    shapes = _SHAPES_3D if cores else _SHAPES_2D
    return ", ".join(f"{shape} ({generation}-{chips * (2 if cores else 1)})" for chips, shape in shapes.items())


def topology(name: str, num_slices: int = 1) -> Topology:
    """`v5p-64` or `v5p:4x4x4` (num_slices of them); ConfigError (a usage error) naming the name and the accepted forms."""
    bad = ConfigError(f"unknown TPU topology {name!r}: expected {FORMS}")
    if num_slices < 1:
        raise ConfigError(f"--num_slices={num_slices} must be >= 1")
    text = name.strip().lower()
    if ":" in text:
        gen, _, shape = text.partition(":")
        gen = _ALIASES.get(gen, gen)
        dims = shape.split("x")
        if gen not in HBM_PER_CHIP or not all(d.isdigit() and int(d) > 0 for d in dims) or \
                len(dims) != (3 if gen in _CORES_IN_NAME else 2):
            raise bad
        return Topology(gen, shape, num_slices)
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if not match:
        raise bad
    gen, count = _ALIASES.get(match.group(1), match.group(1)), int(match.group(2))
    if gen not in HBM_PER_CHIP:
        raise bad
    chips = count // 2 if gen in _CORES_IN_NAME else count
    shapes = _SHAPES_3D if gen in _CORES_IN_NAME else _SHAPES_2D
    if chips not in shapes or (gen in _CORES_IN_NAME and count % 2):
        raise ConfigError(f"{name!r}: no {gen} slice of that size (sizes: "
                         f"{', '.join(f'{gen}-{c * (2 if gen in _CORES_IN_NAME else 1)}' for c in shapes)})")
    return Topology(gen, shapes[chips], num_slices)


# ----------------------------------------------------------------------------------------------
# The optimized HLO: computations, loops, collectives

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_OP = re.compile(r"=\s*(.*?)\s+(all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)(-start)?\(")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2}


def _array_bytes(dtype: str, dims: str) -> int:
    size = _BYTES.get(dtype) or max(1, int(re.sub(r"\D", "", dtype) or 8) // 8)
    return size * math.prod(int(d) for d in dims.split(",") if d)


def _split_computations(text: str) -> tuple[dict[str, list[str]], str]:
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None and line.strip() and line.strip() != "}":
            comps[current].append(line)
    return comps, entry


def _trip_count(while_line: str, condition: list[str]) -> int:
    """A scan's loop count: XLA's `known_trip_count` where it annotates the while, else the bound the
    condition compares the counter with (its largest integer constant); 1 where neither is found."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_line)
    if known:
        return int(known.group(1))
    values = [int(v) for line in condition for v in re.findall(r"s32\[\](?:\{[^}]*\})?\s+constant\((\d+)\)", line)]
    return max(values, default=1)


def _executions(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times each computation runs per execution of the entry (while bodies x trip count)."""
    counts: dict[str, int] = defaultdict(int)

    def visit(name: str, times: int, depth: int = 0) -> None:
        if depth > 64 or name not in comps:
            return
        counts[name] += times
        for line in comps[name]:
            body = re.search(r"body=%?([\w.\-]+)", line)
            if body:
                cond = re.search(r"condition=%?([\w.\-]+)", line)
                visit(body.group(1), times * _trip_count(line, comps.get(cond.group(1), []) if cond else []), depth + 1)
            for callee in re.findall(r"(?:calls|branch_computations)=\{?([%\w.\-, ]+)\}?", line):
                for c in callee.split(","):
                    visit(c.strip().lstrip("%"), times, depth + 1)

    visit(entry, 1)
    return counts


def _groups(line: str, num_devices: int) -> list[list[int]]:
    """The device groups of a collective (logical device ids), from any of XLA's printed forms."""
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", line)
    if pairs:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)", pairs.group(1) + "}")]
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=(\S+?\)|\[[\d,]*\]))?\s*\{([^}]*)\}", line)
    if mesh:
        sizes = [(n, int(s)) for n, s in re.findall(r"'([\w]+)'=(\d+)", mesh.group(1))]
        ids = _device_ids(mesh.group(2), num_devices).reshape([s for _, s in sizes])
        grouped = [i for i, (n, _) in enumerate(sizes) if f"'{n}'" in mesh.group(3)]
        rest = [i for i in range(len(sizes)) if i not in grouped]
        ids = ids.transpose(rest + grouped).reshape(-1, math.prod(sizes[i][1] for i in grouped) or 1)
        return ids.tolist()
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=(\[[\d,]+\](?:T\([\d,]+\))?)", line)
    if iota:
        return _device_ids(iota.group(3), num_devices).reshape(int(iota.group(1)), int(iota.group(2))).tolist()
    explicit = re.search(r"replica_groups=\{(\{[\d,{} ]*\})\}", line)
    if explicit:
        groups = [[int(v) for v in g.split(",") if v.strip()] for g in re.findall(r"\{([\d, ]*)\}", explicit.group(1))]
        return [g for g in groups if g] or [list(range(num_devices))]
    return [list(range(num_devices))]


def _device_ids(spec: str | None, num_devices: int) -> np.ndarray:
    """`[a,b]T(1,0)` / `([a,b]T(1,0))` / `[8]` (an iota reshaped and transposed) or an explicit list."""
    if not spec:
        return np.arange(num_devices)
    if spec.startswith("("):
        spec = spec[1:-1]
    match = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", spec)
    if not match:
        return np.arange(num_devices)
    dims = [int(d) for d in match.group(1).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if match.group(2):
        ids = ids.transpose([int(p) for p in match.group(2).split(",")])
    return ids.reshape(-1)


def _axes(groups: list[list[int]], mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes along which the members of a collective's groups differ."""
    varying = set()
    for group in groups:
        coords = np.array([np.unravel_index(i, mesh.devices.shape) for i in group if i < mesh.devices.size])
        if len(coords) > 1:
            varying |= {mesh.axis_names[a] for a in range(coords.shape[1]) if len(set(coords[:, a])) > 1}
    return tuple(a for a in mesh.axis_names if a in varying)


def _slice_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes along which the TPU slice changes: their collectives cross DCN."""
    slices = np.vectorize(lambda d: getattr(d, "slice_index", 0) or 0)(mesh.devices)
    return tuple(name for a, name in enumerate(mesh.axis_names) if (np.diff(slices, axis=a) != 0).any())


def _crosses_slices(groups: list[list[int]], mesh: Mesh) -> bool:
    flat = mesh.devices.reshape(-1)
    return any(len({getattr(flat[i], "slice_index", 0) for i in g if i < flat.size}) > 1 for g in groups)


def collectives(text: str, mesh: Mesh) -> dict:
    """{kind: {count, bytes, by_axes: {"fsdp": {count, bytes}, ...}, dcn_count, dcn_bytes}} per step.

    bytes: the size of each op's result on one device (an all-gather's gathered array, a
    reduce-scatter's shard, a collective-permute's received buffer), summed over its executions.
    XLA:TPU writes a reduce-scatter as a fusion around an all-reduce (`all-reduce-scatter`); it
    counts as a reduce-scatter here. Across slices, XLA:TPU hands a collective to the Megascale
    runtime as a host-transfer `send` (its rendezvous names the collective): those count as that
    collective over the mesh axes that change slice, all of it DCN.
    """
    comps, entry = _split_computations(text)
    runs = _executions(comps, entry)
    scatter_fusions = {name for name in comps if name.startswith("all-reduce-scatter")}
    out = {kind: {"count": 0, "bytes": 0, "by_axes": {}, "dcn_count": 0, "dcn_bytes": 0} for kind in COLLECTIVES}
    for name, lines in comps.items():
        times = runs.get(name, 0)
        if not times:
            continue
        for line in lines:
            fused = re.search(r"calls=%?([\w.\-]+)", line)
            megascale = re.search(r'_xla_host_transfer_rendezvous="([a-z\-]+)', line) if " send(" in line and \
                "xla_megascale_runtime" in line else None
            if megascale:
                kind = megascale.group(1) if megascale.group(1) in COLLECTIVES else "all-reduce"
                nbytes = _array_bytes(*_ARRAY.findall(line.split("=", 1)[1])[0]) * times
                _add(out[kind], "+".join(_slice_axes(mesh)) or "none", times, nbytes, dcn=True)
                continue
            if fused and fused.group(1) in scatter_fusions:
                kind, start = "reduce-scatter", False
                shapes = _ARRAY.findall(line.split("=", 1)[1].split(" fusion(")[0])
                group_line = next((l for l in comps[fused.group(1)] if "all-reduce(" in l), line)
            else:
                op = _OP.search(line)
                if not op or name in scatter_fusions:
                    continue
                kind, start = op.group(2), bool(op.group(3))
                shapes = _ARRAY.findall(op.group(1))
                group_line = line
            arrays = [s for s in shapes if s[1]]  # scalars are the async ops' sync flags
            if start and kind in ("all-gather", "collective-permute"):
                arrays = arrays[len(arrays) // 2:]  # (operands, results): count the results
            nbytes = sum(_array_bytes(d, dims) for d, dims in arrays) * times
            groups = _groups(group_line, mesh.devices.size)
            _add(out[kind], "+".join(_axes(groups, mesh)) or "none", times, nbytes, dcn=_crosses_slices(groups, mesh))
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
