"""Checkpoint I/O: how long an async save blocks the training loop, and save/restore GB/s
against the disk's own write bandwidth measured in the same run.

    python bench/checkpoint_io.py [--gb 1.5] [--saves 3] [--dir /tmp]

Prints a table and writes bench/results/checkpoint_io.json. The state is random float32
(constant data compresses to nothing and flatters the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from tttjax.checkpoint import CheckpointManager
from tttjax.rundir import step_dir

LEAF_MB = 64
RESULTS = Path(__file__).resolve().parent / "results" / "checkpoint_io.json"


def make_state(gb: float) -> dict:
    """A params/opt-like pytree of 64 MiB random float32 leaves."""
    n = max(1, round(gb * 1024 / LEAF_MB))
    rng = np.random.default_rng(0)
    rows = LEAF_MB * 2**20 // 4 // 4096
    leaves = [jnp.asarray(rng.standard_normal((rows, 4096), dtype=np.float32)) for _ in range(n)]
    half = n // 2
    return {"params": {f"w{i}": x for i, x in enumerate(leaves[:half])},
            "opt": {f"mu{i}": x for i, x in enumerate(leaves[half:])}, "step": jnp.int32(0)}


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def disk_write(path: Path, size: int, fsync: bool) -> float:
    """Seconds to write `size` random bytes in 64 MiB chunks (plus fsync if asked)."""
    chunk = np.random.default_rng(1).bytes(LEAF_MB * 2**20)
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    dt = time.perf_counter() - t
    path.unlink()
    return dt


def drop_from_page_cache(directory: Path) -> None:
    """Flushes, then evicts the checkpoint's files from the page cache (a cold read)."""
    os.sync()
    for p in directory.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.5, help="state size in GiB")
    ap.add_argument("--saves", type=int, default=3, help="async saves to time")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ckpt_bench_", dir=a.dir))
    load_before = os.getloadavg()[0]  # other jobs on the machine skew every number below
    state = make_state(a.gb)
    size, leaves = nbytes(state), len(jax.tree.leaves(state))
    gib = size / 2**30
    times: dict[str, list[float]] = {}
    notes: dict[str, tuple[str, bool]] = {}

    def record(what: str, seconds: float, note: str = "", rate: bool = True) -> None:
        times.setdefault(what, []).append(seconds)
        notes[what] = (note, rate)

    def disk_probe() -> None:
        for fsync in (False, True):
            what = "disk write + fsync" if fsync else "disk write (buffered)"
            record(what, disk_write(work / "probe.bin", size, fsync), "raw file, same size; start+end")

    try:
        disk_write(work / "probe.bin", size, fsync=True)  # warm-up: a fresh VM faults page cache in once
        disk_probe()
        m = CheckpointManager(work / "async", max_to_keep=2, save_interval_steps=1)
        for step in range(1, a.saves + 1):
            t = time.perf_counter()
            m.save(step, state, {"next_index": step})
            record("async save: loop blocked", time.perf_counter() - t, "save() call; 1st = setup", False)
            m.wait_until_finished()
            record("async save: until committed", time.perf_counter() - t, "save() + wait")
        params = {k: np.asarray(v).astype(ml_dtypes.bfloat16) for k, v in state["params"].items()}
        t = time.perf_counter()
        m.save(a.saves + 1, state, {}, (params, {"bench": True}, "consolidated.safetensors"))
        record("async save + bf16 export: blocked", time.perf_counter() - t, "export: params in bf16", False)
        m.wait_until_finished()
        record("async save + bf16 export: committed", time.perf_counter() - t, "", False)
        m.close()

        m = CheckpointManager(work / "sync", max_to_keep=None, save_interval_steps=1, enable_async=False)
        for step in (1, 2):
            t = time.perf_counter()
            m.save(step, state, {"next_index": step})
            record("sync save", time.perf_counter() - t, "enable_async=False")
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        del state
        for cold in (True, False, False):
            if cold:
                drop_from_page_cache(step_dir(work / "sync", 1))
            t = time.perf_counter()
            jax.block_until_ready(m.restore(1, target)[0])
            what = "restore (cold: evicted from page cache)" if cold else "restore (warm: page cache)"
            record(what, time.perf_counter() - t)
        m.close()
        on_disk = sum(p.stat().st_size for p in step_dir(work / "sync", 1).rglob("*") if p.is_file())
        disk_probe()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    load = (load_before, os.getloadavg()[0])
    print(f"\ncheckpoint I/O: state {gib:.2f} GiB in {leaves} leaves, {on_disk / 2**30:.2f} GiB on disk,"
          f" {os.cpu_count()} CPUs, load average {load[0]:.1f} -> {load[1]:.1f}")
    print(f"{'what':40s} {'n':>2s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'GiB/s':>6s}  note")
    for what, ts in times.items():
        note, rate = notes[what]
        med = float(np.median(ts))
        gbps = f"{gib / med:.2f}" if rate else ""
        print(f"{what:40s} {len(ts):2d} {med:9.3f} {min(ts):7.3f} {max(ts):7.3f} {gbps:>6s}  {note}")
    result = {
        "state_gib": gib, "leaves": leaves, "on_disk_gib": on_disk / 2**30, "cpus": os.cpu_count(),
        "host": platform.node(), "jax": jax.__version__, "dir": str(work), "load_average_before_after": load,
        "seconds": times,
        "gib_per_s_median": {w: gib / float(np.median(t)) for w, t in times.items() if notes[w][1]},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")

if __name__ == "__main__":
    main()
