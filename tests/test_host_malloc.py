"""host_malloc: a launcher re-executed with malloc on huge pages faults its buffers in 2 MiB at a
time instead of 4 KiB."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tttjax.host_malloc import huge_pages_available

ROOT = Path(__file__).resolve().parents[1]

# A "launcher" that re-executes itself, then runs a jitted function whose 64 MiB temporary and
# result (beyond glibc's mmap threshold) are mapped and unmapped on every call; prints its
# GLIBC_TUNABLES and the minor page faults per call.
_PROBE = """
import json, os, resource
from tttjax.host_malloc import reexec_with_huge_pages
reexec_with_huge_pages()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.tanh(x.T) * x)
x = jnp.full((4096, 4096), 0.01, jnp.float32)
for _ in range(3):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8
print(json.dumps([os.environ.get("GLIBC_TUNABLES", ""), faults]))
"""


def _probe(huge_pages: str):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["TTTJAX_HUGE_PAGES"] = huge_pages
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not huge_pages_available(), reason="needs glibc >= 2.35 and transparent huge pages")
def test_reexec_on_huge_pages_spares_most_page_faults():
    (tunables_off, default), (tunables_on, faults) = _probe("0"), _probe("1")
    assert tunables_off == "" and tunables_on == "glibc.malloc.hugetlb=1"
    # glibc's defaults map both 64 MiB buffers afresh on every call: a fault per 4 KiB page.
    assert default >= 2 * 16384, default
    # On huge pages a fault maps 2 MiB (some 4 KiB ones remain where a huge page is not available).
    assert faults < default / 10, (faults, default)
