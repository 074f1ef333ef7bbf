"""The accelerators a compiled step is predicted for: one table, each figure with its public source.

API: `CHIPS[name]` -> `Chip` (names: v4, v5e, v5p, v6e, h100, h200); `chip(name)` refuses an
unknown name in one line; `for_device(device_kind)` finds a JAX device's entry. Rates are per chip (a v4 / v5p chip is two TensorCores that XLA drives
as one device, so the per-device figure equals the per-chip one there too).

Conventions: bandwidths are bytes/s in ONE direction (a bidirectional figure is twice these);
`ici_link_bw` is one link, `ici_links` how many a chip has (a torus dimension uses two of them,
one each way); `dcn_host_bw` is what one host's NICs move, shared by `chips_per_host` chips.
`mxu_tile` is the (M, K, N) a dot's shape is padded to on the matrix unit (perf.mxu_efficiency).
`wraparound` says which slices close their torus rings (scaling-book tpus.md): without the
wraparound link a ring collective runs over a line, at half the bandwidth.
"""

from __future__ import annotations

import dataclasses

GiB = 1024 ** 3
GB = 10 ** 9


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    bf16_flops: float  # dense bf16 peak, FLOP/s
    hbm_bytes: int  # memory per chip
    hbm_bw: float  # HBM bandwidth, bytes/s
    ici_link_bw: float  # one interconnect link, one direction, bytes/s (GPU: NVLink per GPU, one direction)
    ici_links: int  # links per chip (GPU: 1, a switch: every GPU reaches every other at ici_link_bw)
    dcn_host_bw: float  # data-center network per host (GPU: per node), one direction, bytes/s
    chips_per_host: int
    mxu_tile: tuple[int, int, int]  # (M, K, N) a dot is padded to
    torus_dims: int  # 2 or 3 (TPU); 0: a switched node (GPU)
    source: str  # where each figure comes from


_SCALING_BOOK = "jax-ml/scaling-book tpus.md (2025-02)"
CHIPS = {c.name: c for c in [
    Chip("v4", 275e12, 32 * GiB, 1200 * GB, 45 * GB, 6, 25 * GB, 4, (128, 128, 128), 3,
         "cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s, 3-D torus; "
         f"{_SCALING_BOOK}: ICI 4.5e10 B/s one way per link, 4 chips per host, DCN ~2.5e10 B/s per host"),
    Chip("v5e", 197e12, 16 * GiB, 819 * GB, 50 * GB, 4, 25 * GB, 8, (128, 128, 128), 2,
         "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, 400 GB/s bidirectional "
         "ICI per chip over 4 ports (50 GB/s one way per link), 8 chips and 2 x 100 Gb/s NICs per host, "
         f"2-D torus ({_SCALING_BOOK} gives 4.5e10 B/s per link)"),
    Chip("v5p", 459e12, 95 * GiB, 2765 * GB, 100 * GB, 6, 25 * GB, 4, (128, 128, 128), 3,
         "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s, 1200 GB/s "
         "bidirectional ICI per chip over a 3-D torus (100 GB/s one way per link), DCN 50 Gb/s per chip, "
         f"4 chips per host ({_SCALING_BOOK} gives 9e10 B/s per link)"),
    Chip("v6e", 918e12, 32 * GiB, 1638 * GB, 100 * GB, 4, 25 * GB, 8, (256, 256, 256), 2,
         "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM at 1638 GB/s, 800 GB/s bidirectional "
         "ICI per chip over 4 ports (100 GB/s one way per link), 256x256 MXUs, 8 chips per host, 2-D torus; "
         f"DCN per host not on that page: {_SCALING_BOOK}'s typical ~2.5e10 B/s"),
    Chip("h100", 989e12, 80 * GB, 3350 * GB, 450 * GB, 1, 400 * GB, 8, (128, 64, 128), 0,
         "nvidia.com H100 SXM datasheet: 989 TFLOP/s dense bf16 (1979 with sparsity), 80 GB HBM3 at 3.35 TB/s, "
         "NVLink 4 900 GB/s bidirectional per GPU through NVSwitch; DGX H100: 8 GPUs and 8 x 400 Gb/s "
         "ConnectX-7 per node. Not checked at nvidia.com here (no page in the search index); the dot tile "
         "is a common cuBLAS/CUTLASS bf16 CTA tile, an assumption"),
    Chip("h200", 989e12, 141 * GB, 4800 * GB, 450 * GB, 1, 400 * GB, 8, (128, 64, 128), 0,
         "nvidia.com H200 datasheet: the H100's compute and NVLink with 141 GB HBM3e at 4.8 TB/s. Not checked at "
         "nvidia.com here; as h100 otherwise"),
]}


def chip(name: str) -> Chip:
    if name not in CHIPS:
        raise ValueError(f"unknown chip {name!r}: expected one of {', '.join(CHIPS)}")
    return CHIPS[name]


def wraparound(chip_: Chip, shape: tuple[int, ...]) -> tuple[bool, ...]:
    """Which dimensions of a slice of `shape` chips close their ring (scaling-book tpus.md): v4 / v5p
    slices made of whole 4x4x4 cubes get optical wraparounds on every dimension (a 2x2x4 gets none),
    v5e / v6e wrap a dimension of 16 only."""
    if chip_.torus_dims == 3:
        return (all(d % 4 == 0 for d in shape),) * len(shape)
    return tuple(d == 16 for d in shape)


_DEVICE_KINDS = {"tpu v4": "v4", "tpu v5 lite": "v5e", "tpu v5e": "v5e", "tpu v5p": "v5p", "tpu v5": "v5p",
                 "tpu v6 lite": "v6e", "tpu v6e": "v6e"}


def for_device(device_kind: str) -> Chip | None:
    """The entry for a JAX device's `device_kind` ("TPU v5 lite", "NVIDIA H100 80GB HBM3"), None if unknown."""
    kind = device_kind.lower()
    if kind in _DEVICE_KINDS:
        return CHIPS[_DEVICE_KINDS[kind]]
    return next((c for name, c in CHIPS.items() if c.torus_dims == 0 and name in kind), None)
