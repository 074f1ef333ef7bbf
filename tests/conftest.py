"""Test-wide JAX settings: the CPU backend (with libtpu installed, JAX would otherwise probe for a
TPU in every process; TPU topologies are still compiled for, tests/test_compile.py), and a
persistent compilation cache, so identical programs compiled by different tests (each Trainer
builds its own jit) and by their subprocesses compile once."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "tttjax-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
