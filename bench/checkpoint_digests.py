"""What the checkpoint digests cost: per save and per restore, on a config's real train-state shapes.

    python bench/checkpoint_digests.py [--config configs/tiny.py] [--saves 2] [--dir /tmp]

The state is random data (fp32 masters and AdamW moments, constant data would compress to nothing)
of the config's trainable params, on one device. Timed in one run, alternating:
- the digests alone (what Orbax's background thread computes for a save: `digests.start(...).result()`);
- a save until committed (async save + wait, as the trainer saves), with digests and without
  (`digests.start` replaced by an empty record in this process only);
- a restore, and the digest check of what it restored.
The cost is the digests' own time over the save's time without them (an upper bound: in a save
they run beside Orbax's writers). Prints a table, writes bench/results/checkpoint_digests_<name>.json.
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
import numpy as np

from tttjax.checkpoint import digests
from tttjax.checkpoint import manager as manager_mod
from tttjax.checkpoint.manager import CheckpointManager
from tttjax.config import reader
from tttjax.train.program import build_program
from tttjax.trees import abstract

RESULTS = Path(__file__).resolve().parent / "results"


def random_state(config_path: str):
    """The config's train state (abstract from the program, nothing compiled) filled with random data."""
    program = build_program(reader.load(config_path, []))
    rng = np.random.default_rng(0)

    def fill(x):
        if np.issubdtype(x.dtype, np.floating):
            value = rng.standard_normal(x.shape, dtype=np.float32).astype(x.dtype)
        else:
            value = rng.integers(0, 1000, size=x.shape).astype(x.dtype)
        return jax.device_put(value, x.sharding)

    return jax.tree.map(fill, program.state)


def timed(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/tiny.py")
    ap.add_argument("--saves", type=int, default=2, help="saves of each kind to time")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    a = ap.parse_args()
    state = random_state(a.config)
    leaves = jax.tree.leaves(state)
    size, count = sum(x.nbytes for x in leaves), len(leaves)
    work = Path(tempfile.mkdtemp(prefix="digest_bench_", dir=a.dir))
    load = [os.getloadavg()[0]]
    times: dict[str, list[float]] = {}
    real_start = digests.start
    try:
        digests.start(state).result()  # warm-up (page faults of the fresh arrays)
        m = CheckpointManager(work / "run", max_to_keep=2, save_interval_steps=1)
        m.save(1, state, {"next_step": 1})  # the first save sets Orbax up: not timed
        m.wait_until_finished()
        for i in range(a.saves):
            times.setdefault("digests alone", []).append(timed(lambda: real_start(state).result()))
            for with_digests in (True, False):
                step = 2 + 2 * i + (not with_digests)
                manager_mod.digests.start = real_start if with_digests else (lambda s, **k: digests.Pending([]))
                what = "save until committed, " + ("with digests" if with_digests else "without digests")
                times.setdefault(what, []).append(timed(lambda: (m.save(step, state, {"next_step": step}),
                                                                 m.wait_until_finished())))
        manager_mod.digests.start = real_start
        target, last = abstract(state), 2 * a.saves  # the last save with digests
        state = leaves = restored = None  # host memory for the restore (a 7B-shaped state is 6.7 GiB)

        def restore():
            nonlocal restored
            restored = jax.block_until_ready(m.restore(last, target)[0])

        times["restore, with its digest check"] = [timed(restore)]
        times["digest check of a restored state"] = [timed(lambda: digests.computed(restored))]
        m.close()
        on_disk = sum(p.stat().st_size for p in (work / "run" / "checkpoints" / f"checkpoint_{last:06d}").rglob("*")
                      if p.is_file())
    finally:
        manager_mod.digests.start = real_start
        shutil.rmtree(work, ignore_errors=True)
    load.append(os.getloadavg()[0])
    median = {k: float(np.median(v)) for k, v in times.items()}
    save = median["save until committed, without digests"]
    cost = median["digests alone"] / save
    name = Path(a.config).stem
    print(f"\ncheckpoint digests, {a.config}: state {size / 2**30:.3f} GiB in {count} arrays, "
          f"{on_disk / 2**30:.3f} GiB on disk, {os.cpu_count()} CPUs, load average {load[0]:.1f} -> {load[1]:.1f}")
    print(f"{'what':42s} {'n':>2s} {'median s':>9s} {'min s':>8s} {'max s':>8s}")
    for what, ts in times.items():
        print(f"{what:42s} {len(ts):2d} {np.median(ts):9.4f} {min(ts):8.4f} {max(ts):8.4f}")
    print(f"digests / save without them: {100 * cost:.2f}%")
    result = {"config": a.config, "state_gib": size / 2**30, "arrays": count, "on_disk_gib": on_disk / 2**30,
              "cpus": os.cpu_count(), "host": platform.node(), "jax": jax.__version__, "backend": jax.default_backend(),
              "load_average_before_after": load, "seconds": times, "digest_cost_fraction": cost}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"checkpoint_digests_{name}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
