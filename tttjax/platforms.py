"""Which JAX platforms a command starts: libtpu only where there is a TPU or the user asks for one.

With libtpu installed (`jax[tpu]`, which the test dependencies add), JAX's default platform search
loads libtpu in every process, also on a host without a TPU: libtpu prints its start-up errors (the
`E0000 ... TPU_WORKER_HOSTNAMES` block) and holds `/tmp/libtpu_lockfile` for the life of the
process, so a second libtpu user on the host (`tttjax.compile`) is refused. Every command line
calls `select_platforms()` before it touches a JAX backend. Its rules, first match wins:

1. `JAX_PLATFORMS` set by the user (even empty, which asks for JAX's own search): left alone.
2. `tttjax.compile` (`for_tpu_compile=True`): `cpu`. It compiles for abstract TPU devices through
   libtpu's compiler and runs nothing, so it needs no accelerator of this host.
3. libtpu not installed, a TPU on this host, or a GPU visible: left alone (JAX's search starts the
   TPU or finds the GPU plugin; on a GPU host with libtpu, `JAX_PLATFORMS=cuda` keeps libtpu off).
4. Otherwise: `cpu`.

A compile whose platforms leave the TPU out (rule 2, or the user's `JAX_PLATFORMS=cpu`) also gets
`ALLOW_MULTIPLE_LIBTPU_LOAD=1`: libtpu then neither checks nor takes `/tmp/libtpu_lockfile` (measured
with libtpu 0.0.42.1), which guards the TPU chips that such a process never opens, so it compiles
beside a training that holds libtpu, and a training started during the compile is not refused.

A TPU is present when Linux lists a PCI device of Google's vendor id 0x1ae0 (JAX's own test,
jax/_src/hardware_utils.py, which also counts the chips it knows: any Google device counts here, so a
chip newer than the installed JAX still does) or where libtpu's device files are (`/dev/accel*`,
`/dev/vfio/<n>`: containers may hide sysfs). GPUs as JAX looks for them: `/dev/nvidia0`,
`/dev/nvidiactl`, `/dev/dxg` (WSL), `/dev/kfd` (ROCm).
"""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

import jax

GOOGLE_PCI_VENDOR = "0x1ae0"
_GPU_FILES = ("dev/nvidia0", "dev/nvidiactl", "dev/dxg", "dev/kfd")


def has_tpu(root: str = "/") -> bool:
    """A TPU attached to this host (see the module docstring); reads sysfs and /dev under `root` only."""
    for vendor in glob.glob(os.path.join(root, "sys/bus/pci/devices/*/vendor")):
        try:
            if Path(vendor).read_text().strip() == GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    devices = glob.glob(os.path.join(root, "dev/accel*")) + glob.glob(os.path.join(root, "dev/vfio/*"))
    return any(Path(d).name.startswith("accel") or Path(d).name.isdigit() for d in devices)


def has_gpu(root: str = "/") -> bool:
    return any(os.path.exists(os.path.join(root, p)) for p in _GPU_FILES)


def select_platforms(*, for_tpu_compile: bool = False) -> None:
    """Sets JAX's platforms for this process (and the processes it starts) by the rules above;
    call it before anything initialises a JAX backend."""
    if "JAX_PLATFORMS" not in os.environ and (for_tpu_compile or _libtpu_for_nothing()):
        os.environ["JAX_PLATFORMS"] = "cpu"
        jax.config.update("jax_platforms", "cpu")
    chosen = os.environ.get("JAX_PLATFORMS", "")  # empty: JAX's search, which takes a TPU of this host
    if for_tpu_compile and chosen and "tpu" not in chosen.split(","):
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _libtpu_for_nothing() -> bool:
    """JAX's search would start libtpu (installed) on a host with neither a TPU nor a GPU."""
    return importlib.util.find_spec("libtpu") is not None and not has_tpu() and not has_gpu()
