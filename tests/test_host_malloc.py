"""host_malloc: with it, a repeated XLA computation reuses its buffers' pages instead of faulting
them in again on every call."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A jitted function whose 64 MiB temporary and result (beyond glibc's 32 MiB mmap threshold) are
# allocated and freed on every call; prints whether the settings took and the faults per call.
_PROBE = """
import json, resource
from tttjax.host_malloc import keep_freed_memory
kept = keep_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.tanh(x.T) * x)
x = jnp.full((4096, 4096), 0.01, jnp.float32)
for _ in range(6):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    f(x).block_until_ready()
print(json.dumps([kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8]))
"""


def _probe(keep: str):
    env = dict(os.environ, TTTJAX_KEEP_FREED_MEMORY=keep)
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")
def test_kept_memory_spares_the_page_faults_of_every_call():
    (kept_default, default), (kept, faults) = _probe("0"), _probe("1")
    assert not kept_default and kept
    # glibc's defaults map both 64 MiB buffers afresh on every call: a fault per 4 KiB page.
    assert default >= 2 * 16384, default
    # Kept: the freed blocks are reused (a few calls may still grow the heap once).
    assert faults < default / 4, (faults, default)
