"""Digests of a train state's arrays: what a step's `digests/` item records and a restore checks.

Orbax stores no checksums, so a flipped bit in a chunk that still decompresses restores silently
into a wrong model. Every save records, per process and for each of its shards, a 64-bit digest;
a restore recomputes them on the arrays it got and refuses a step that differs (`Mismatch`).

The digest of a region of an array is two sums of its elements' bit patterns b (read as unsigned
integers), each weighted by the element's flat position in the whole array, modulo 2^32:

    lane 0 = sum (2 i + 1) b,   lane 1 = sum (2 j + 1) b     (i: C-order index, j: Fortran order)

A shard's digest is its elements' share of those sums, so the shard digests of any sharding add up
to the array's: a restore onto the same shards compares them one by one (and names the shard), a
restore onto another mesh or process count compares the arrays' totals. Any change confined to one
element is always detected (odd weights are invertible modulo 2^32); other damage escapes with
probability about 2^-64. It is a checksum against storage faults, not a cryptographic hash.

Computed on the host with numpy from marginal sums (two passes over the data) on the CPU backend,
where a device buffer is host memory (a zero-copy view also keeps the next step from donating it),
or by XLA on the device elsewhere (one program dispatched at save time; its tiny result is fetched
later); both give the same numbers. Either way the work and the wait happen in Orbax's background
thread, not on the training thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import future

MASK = (1 << 32) - 1
FORMAT = 1
BLOCK_BYTES = 1 << 20  # the host digest reads an array in blocks this size (it stays in cache for both sums)


def path_name(path) -> str:
    """`params/ttt/w1` for a tree path (dict keys, attributes, sequence indices joined by /)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def _strides(shape) -> tuple[list[int], list[int]]:
    """Element strides of `shape` in C and in Fortran order."""
    c = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    f = [math.prod(shape[:d]) for d in range(len(shape))]
    return c, f


def _unsigned(x: np.ndarray) -> np.ndarray:
    """The elements' bit patterns as unsigned integers of their own width."""
    if x.dtype.itemsize not in (1, 2, 4):
        raise TypeError(f"no digest for {x.itemsize}-byte dtype {x.dtype}")
    return np.ascontiguousarray(x).view(f"u{x.dtype.itemsize}")


def _combine(marginals, offsets, shape, total: int) -> tuple[int, int]:
    """(lane 0, lane 1) from the marginal sums m_d of a region at `offsets` of an array of `shape`:
    sum i b = sum_d stride_d sum_k (offset_d + k) m_d[k]."""
    c, f = _strides(shape)
    weighted = [int(np.sum((np.arange(len(m), dtype=np.uint64) + np.uint64(o)) * m.astype(np.uint64),
                           dtype=np.uint64)) for m, o in zip(marginals, offsets)]
    lane0 = 2 * sum(s * w for s, w in zip(c, weighted)) + total
    lane1 = 2 * sum(s * w for s, w in zip(f, weighted)) + total
    return lane0 & MASK, lane1 & MASK


def host_digest(block: np.ndarray, offsets, shape) -> tuple[int, int]:
    """The digest of `block`, the region of an array of `shape` that starts at `offsets`."""
    b = _unsigned(np.asarray(block))
    if b.ndim == 0:
        return int(b) & MASK, int(b) & MASK
    rows = b.reshape(-1, b.shape[-1])
    last = np.zeros(rows.shape[1], np.uint32)
    leading = np.empty(rows.shape[0], np.uint32)
    step = max(1, BLOCK_BYTES // max(1, rows.shape[1] * rows.itemsize))
    for start in range(0, rows.shape[0], step):  # both sums of a block while it is in cache: one read
        block = rows[start:start + step]
        last += block.sum(axis=0, dtype=np.uint32)
        leading[start:start + step] = block.sum(axis=1, dtype=np.uint32)
    leading = leading.reshape(b.shape[:-1])
    marginals = [leading.sum(axis=tuple(a for a in range(b.ndim - 1) if a != d), dtype=np.uint32)
                 for d in range(b.ndim - 1)] + [last]
    return _combine(marginals, offsets, shape, int(last.sum(dtype=np.uint64)))


def _grid(x: jax.Array) -> tuple[int, ...]:
    """Shards per dimension of `x`'s sharding (the project shards only dimensions that divide)."""
    block = x.sharding.shard_shape(x.shape)
    return tuple(n // b for n, b in zip(x.shape, block))


@functools.lru_cache(maxsize=8)
def _device_program(mesh: jax.sharding.Mesh, grids: tuple):
    """The jitted `_device_lanes` for `grids`, its outputs replicated so that every process reads them."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(functools.partial(_device_lanes, grids=grids), out_shardings=replicated)


def _device_lanes(xs, grids):
    """For each array, its shards' (lane 0, lane 1) as an array [*grid, 2], by the formula itself."""
    out = []
    for x, grid in zip(xs, grids):
        if x.dtype == jnp.bool_:
            bits = x.astype(jnp.uint32)
        else:
            bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"u{x.dtype.itemsize}")).astype(jnp.uint32)
        c, f = _strides(x.shape)
        ci = fi = jnp.zeros(x.shape, jnp.uint32)
        for d in range(x.ndim):
            iota = jax.lax.broadcasted_iota(jnp.uint32, x.shape, d)
            ci, fi = ci + iota * np.uint32(c[d] & MASK), fi + iota * np.uint32(f[d] & MASK)
        split = [n for g, size in zip(grid, x.shape) for n in (g, size // g)]
        within = tuple(range(1, 2 * x.ndim, 2))  # each lane its own fused reduction: no array-sized temporary
        out.append(jnp.stack([(bits * (2 * index + 1)).reshape(split).sum(axis=within, dtype=jnp.uint32)
                              for index in (ci, fi)], axis=-1))
    return out


@dataclasses.dataclass
class Pending:
    """Digests being computed for one save: what this process holds, read when the step is written."""

    arrays: list[tuple[str, tuple, str, list]]  # (name, shape, dtype, [(index, replica, block | None)])
    device: list | None = None  # the device program's outputs (accelerators), or None (host views)

    def result(self) -> dict:
        """{name: {"shape", "dtype", "shards": [{"index", "replica", "digest"}]}}: this process's shards."""
        lanes = None if self.device is None else [np.asarray(x) for x in self.device]
        out = {}
        for k, (name, shape, dtype, shards) in enumerate(self.arrays):
            rows = []
            for index, replica, block in shards:
                offsets = [start for start, _ in index]
                if lanes is None:
                    digest = host_digest(block, offsets, shape)
                else:
                    sizes = [stop - start for start, stop in index]
                    where = tuple(o // s if s else 0 for o, s in zip(offsets, sizes))
                    digest = tuple(int(v) for v in lanes[k][where])
                rows.append({"index": index, "replica": replica, "digest": hex_digest(digest)})
            out[name] = {"shape": list(shape), "dtype": dtype, "shards": rows}
        return out


def hex_digest(digest: tuple[int, int]) -> str:
    return f"{digest[1]:08x}{digest[0]:08x}"


def _index(shard, shape) -> list[list[int]]:
    return [[s.start or 0, n if s.stop is None else s.stop] for s, n in zip(shard.index, shape)]


def start(state, *, on_device: bool | None = None) -> Pending:
    """Begins the digests of `state`'s shards on this process, without waiting for any result: by
    XLA on accelerators, by numpy on the CPU backend (`on_device` forces one; both agree)."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    if on_device is None:
        on_device = any(d.platform != "cpu" for _, x in leaves for d in x.sharding.device_set)
    named = [x.sharding for _, x in leaves if isinstance(x.sharding, jax.sharding.NamedSharding)]
    one_mesh = len(named) == len(leaves) and len({sharding.mesh for sharding in named}) == 1
    on_host = not (on_device and one_mesh)  # one device program needs every array on one mesh
    arrays = []
    for path, x in leaves:
        shards = [(_index(s, x.shape), s.replica_id, np.asarray(s.data) if on_host else None)
                  for s in x.addressable_shards]
        arrays.append((path_name(path), tuple(x.shape), str(x.dtype), shards))
    device = None
    if not on_host and leaves:
        xs = [x for _, x in leaves]
        device = _device_program(xs[0].sharding.mesh, tuple(_grid(x) for x in xs))(xs)
    return Pending(arrays, device)


def computed(state) -> dict:
    """This process's shard digests of `state`, now (a restore checks what it got)."""
    return start(state).result()


# -- the step item ------------------------------------------------------------------------------------
def _file(directory, process: int) -> Path:
    return Path(directory) / f"process_{process}.json"


def _write(directory, pending: Pending) -> None:
    path = _file(directory, jax.process_index())
    path.write_text(json.dumps({"format": FORMAT, "process": jax.process_index(),
                                "process_count": jax.process_count(), "arrays": pending.result()}))


class DigestsHandler(ocp.AsyncCheckpointHandler):
    """Each process writes `process_<i>.json` (its shards' digests) in the background."""

    async def async_save(self, directory, args: DigestsSave) -> list[future.Future]:
        async def write() -> None:
            await asyncio.to_thread(_write, directory, args.pending)

        return [future.CommitFutureAwaitingContractedSignals(write(), name="digests_save")]

    def save(self, directory, args: DigestsSave) -> None:
        _write(directory, args.pending)

    def restore(self, directory, args=None) -> dict:
        """Every process file of the item merged: {name: {"shape", "dtype", "shards": [...]}}."""
        merged: dict = {}
        for path in sorted(Path(directory).glob("process_*.json")):
            for name, entry in json.loads(path.read_text())["arrays"].items():
                merged.setdefault(name, {**entry, "shards": []})["shards"] += entry["shards"]
        return merged


@ocp.args.register_with_handler(DigestsHandler, for_save=True)
@dataclasses.dataclass
class DigestsSave(ocp.args.CheckpointArgs):
    pending: Pending


@ocp.args.register_with_handler(DigestsHandler, for_restore=True)
@dataclasses.dataclass
class DigestsRestore(ocp.args.CheckpointArgs):
    pass


# -- checking -------------------------------------------------------------------------------------------
def _total(shards) -> tuple[int, int]:
    lanes = [0, 0]
    for shard in shards:
        if shard["replica"] == 0:
            value = int(shard["digest"], 16)
            lanes = [(lanes[0] + (value & MASK)) & MASK, (lanes[1] + (value >> 32)) & MASK]
    return lanes[0], lanes[1]


def mismatches(saved: dict, restored: dict, restored_totals: dict[str, tuple[int, int]] | None) -> list[str]:
    """What differs between the digests a step recorded (`saved`, every process's) and those of the
    arrays a restore produced: `restored` (this process's shards) and `restored_totals` (every
    array's total over all processes). One entry per array, naming the shards that differ.
    `restored_totals` None: `saved` is this process's own record of these very shards (a local
    copy), so each shard must be recorded and equal."""
    problems = []
    for name, entry in restored.items():
        record = saved.get(name)
        if record is None:
            problems.append(f"{name}: no digest recorded")
            continue
        if record["shape"] != entry["shape"] or record["dtype"] != entry["dtype"]:
            problems.append(f"{name}: recorded as {record['dtype']}{record['shape']}, restored "
                            f"{entry['dtype']}{entry['shape']}")
            continue
        by_index = {json.dumps(s["index"]): s["digest"] for s in record["shards"]}
        missing = None if restored_totals is not None else "none"
        bad = [s["index"] for s in entry["shards"]
               if by_index.get(json.dumps(s["index"]), missing or s["digest"]) != s["digest"]]
        if bad:
            where = ", ".join("[" + ", ".join(f"{a}:{b}" for a, b in index) + "]" for index in bad[:3])
            problems.append(f"{name}: shard {where} differs from its digest")
        elif restored_totals is not None and _total(record["shards"]) != restored_totals[name]:
            problems.append(f"{name}: the array's digest differs")
    return problems


def local_totals(restored: dict) -> np.ndarray:
    """[arrays, 2] uint32: this process's share of each array's lanes (replica 0 shards), in
    `restored`'s order, to be summed over processes."""
    return np.array([_total(entry["shards"]) for entry in restored.values()], np.uint32).reshape(-1, 2)
