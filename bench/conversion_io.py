"""Conversion at 7B scale: import and export throughput against the disk's own bandwidth, and the
peak RSS of each CLI, on a 7B-shaped checkpoint of random bf16 weights.

    python bench/conversion_io.py [--dir /tmp/conversion_bench] [--layers 32]

1. the disk: sequential write (with fsync) and cold read of a 4 GiB file;
2. a PyTorch (moshi layout) safetensors file of the 7B shape, random bf16, streamed to disk;
3. `load_pytorch` alone (onto the CPU devices), then `python -m conversion.from_pytorch` on it
   (cold page cache) -> a tttjax checkpoint dir;
4. `python -m conversion.to_pytorch` on that (cold page cache) -> consolidated.safetensors,
   then a tensor-by-tensor check that the export equals the original file bit for bit.
Each CLI runs as its own process; its peak RSS comes from wait4. Results go to
bench/results/conversion_io.json. Needs ~50 GB of free disk at 32 layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from checkpoint_io import disk_write, drop_from_page_cache  # noqa: E402  (bench/ is the script dir)
from ttt_layer import _cpu_name  # noqa: E402

from tttjax.model.config import MOSHI_7B_LM_KWARGS, from_lm_kwargs  # noqa: E402
from tttjax.weights import layout  # noqa: E402
from tttjax.weights.safetensors_io import SafetensorsReader, SafetensorsWriter  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "conversion_io.json"
PROBE_BYTES = 4 << 30
CHUNK = 64 << 20


def disk_read(path: Path) -> float:
    """Seconds to read `path` cold, in 64 MiB reads."""
    drop_from_page_cache(path.parent)
    buf = bytearray(CHUNK)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


def disk_bandwidth(directory: Path) -> dict:
    probe = directory / "probe.bin"
    write_s = disk_write(probe, PROBE_BYTES, fsync=True)  # deletes the file
    chunk = np.random.default_rng(2).bytes(CHUNK)
    with open(probe, "wb") as f:
        for _ in range(PROBE_BYTES // CHUNK):
            f.write(chunk)
    read_s = disk_read(probe)
    probe.unlink()
    return {"write_GBps": PROBE_BYTES / write_s / 1e9, "read_GBps": PROBE_BYTES / read_s / 1e9}


def random_bf16(rng: np.random.Generator, shape) -> np.ndarray:
    """Random finite bf16 of magnitude ~[2^-7, 2) with random signs, drawn as bit patterns (fast)."""
    bits = rng.integers(0x3C00, 0x4000, size=shape, dtype=np.uint16)
    bits |= (rng.integers(0, 2, size=shape, dtype=np.uint16) << 15)
    return bits.view(ml_dtypes.bfloat16)


def write_pytorch_file(directory: Path, layers: int) -> tuple[Path, Path, int]:
    """The 7B-shaped moshi-layout file (keys sorted, {"format": "pt"}) and its config.json."""
    from flax import nnx

    from tttjax.model.moshi import abstract_model

    kwargs = dict(MOSHI_7B_LM_KWARGS, num_layers=layers)
    cfg = dataclasses.replace(from_lm_kwargs(kwargs), param_dtype="bfloat16")
    abstract = {tuple(str(k) for k in p): tuple(v.shape)
                for p, v in nnx.to_flat_state(nnx.state(abstract_model(cfg)))}
    rows = layout.rows(cfg, "moshi")
    specs = {r.name: (r.torch_shape(abstract[r.path]), np.dtype(ml_dtypes.bfloat16)) for r in rows}
    weights, config = directory / "model.safetensors", directory / "config.json"
    rng = np.random.default_rng(0)
    with SafetensorsWriter(weights, specs, metadata={"format": "pt"}) as w:
        for name in sorted(specs):
            w.write(name, random_bf16(rng, specs[name][0]))
    config.write_text(json.dumps(kwargs, indent=2))
    return weights, config, weights.stat().st_size


def run_cli(args: list[str]) -> dict:
    """Wall time and peak RSS of one `python ...` process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed with status {os.waitstatus_to_exitcode(status)}")
    return {"seconds": seconds, "peak_rss_GiB": usage.ru_maxrss / 2**20}


def same_tensors(a: Path, b: Path) -> int:
    """Tensor-by-tensor bitwise comparison; returns the number of tensors compared."""
    with SafetensorsReader(a) as ra, SafetensorsReader(b) as rb:
        if sorted(ra.names()) != sorted(rb.names()):
            raise SystemExit(f"{a} and {b} hold different tensor names")
        for name in ra.names():
            if not np.array_equal(ra.read(name).view(np.uint16), rb.read(name).view(np.uint16)):
                raise SystemExit(f"{name} differs after the round trip")
        return len(ra.names())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/conversion_bench", help="scratch directory (emptied first)")
    parser.add_argument("--layers", type=int, default=32, help="temporal layers (32 = the 7B model)")
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    disk = disk_bandwidth(root)
    print(f"disk: write {disk['write_GBps']:.2f} GB/s, cold read {disk['read_GBps']:.2f} GB/s", flush=True)

    t = time.perf_counter()
    weights, config, size = write_pytorch_file(root, args.layers)
    generate_s = time.perf_counter() - t
    print(f"wrote {weights} ({size / 1e9:.2f} GB) in {generate_s:.0f} s", flush=True)

    drop_from_page_cache(root)
    onto_devices = run_cli(["-c", f"from tttjax.weights.pytorch import load_pytorch; "
                                  f"load_pytorch({str(weights)!r}, {str(config)!r})"])
    drop_from_page_cache(root)
    imported = run_cli(["-m", "conversion.from_pytorch", "--weights", str(weights), "--config", str(config),
                        "--out", str(root / "imported")])
    drop_from_page_cache(root)
    exported = run_cli(["-m", "conversion.to_pytorch", "--checkpoint_dir", str(root / "imported"),
                        "--out", str(root / "export"), "--dtype", "bfloat16"])
    compared = same_tensors(weights, root / "export" / "consolidated.safetensors")
    rows = []
    # On a CPU host the imported model's "device" memory is host memory: RSS above the model's own
    # bytes is the import's host-side overhead (runtime, staging, Orbax's write buffers).
    for name, r in (("import onto devices (load_pytorch)", onto_devices), ("import CLI (+ Orbax save)", imported),
                    ("export CLI", exported)):
        gbps = size / r["seconds"] / 1e9
        model_gib = size / 2**30 if name.startswith("import") else 0.0
        rows.append(dict(phase=name, GB=size / 1e9, seconds=r["seconds"], GBps=gbps,
                         vs_disk_write=gbps / disk["write_GBps"], vs_disk_read=gbps / disk["read_GBps"],
                         peak_rss_GiB=r["peak_rss_GiB"], rss_beyond_model_GiB=r["peak_rss_GiB"] - model_gib))
    print("\n| phase | GB | s | GB/s | / disk write | / disk read | peak RSS GiB | RSS beyond the model GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['phase']} | {r['GB']:.2f} | {r['seconds']:.0f} | {r['GBps']:.3f} | {r['vs_disk_write']:.2f} | "
              f"{r['vs_disk_read']:.2f} | {r['peak_rss_GiB']:.2f} | {r['rss_beyond_model_GiB']:.2f} |")
    print(f"round trip: {compared} tensors bitwise equal")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(dict(
        date=time.strftime("%Y-%m-%d"), cpu=_cpu_name(), cores=os.cpu_count(), python=platform.python_version(),
        layers=args.layers, disk=disk, generate_s=generate_s, phases=rows, tensors_bitwise_equal=compared,
    ), indent=2))
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
