"""A train step compiled once and reused: `python -m tttjax.compile ... --save_executable DIR` writes
it (as MaxText's train_compile writes compiled_trainstep_file), a run with `compiled_step=DIR` loads
it instead of compiling again on the pod.

DIR/train_step.bin holds jax.experimental.serialize_executable's bytes (XLA's serialized executable
in JAX's own pickle framing, which runs code when loaded: load only directories you wrote);
DIR/manifest.json says what it was compiled for. A run loads it only where its own program is the
same: jax and jaxlib versions, platform, device kind and count, the XLA options it was compiled
with, and the lowered program (config, mesh, shardings, batch shape: its text's SHA-256); anything
else is refused in one line naming the difference.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from importlib import metadata
from pathlib import Path

import jax
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache

from tttjax.errors import UserError

FORMAT = 1
BINARY, MANIFEST = "train_step.bin", "manifest.json"


class ExecutableMismatch(UserError):
    """A saved executable that is not this run's program."""


def manifest(program, lowered) -> dict:
    device = program.mesh.devices.flat[0]
    return {"format": FORMAT, "jax": jax.__version__, "jaxlib": metadata.version("jaxlib"),
            "platform": device.platform, "device_kind": device.device_kind, "num_devices": int(program.mesh.devices.size),
            "mesh": {k: int(v) for k, v in program.mesh.shape.items()}, "batch": list(program.batch.shape),
            "compiler_options": program.compiler_options or {},
            "program_sha256": hashlib.sha256(lowered.as_text().encode()).hexdigest()}


@contextlib.contextmanager
def fresh_compile():
    """Compile what will be saved without JAX's persistent compilation cache: an XLA:CPU executable
    that came from the cache serializes without its kernels (jax 0.10.2: "Function ... not found"
    when the loaded step runs). JAX decides once per process whether the cache is used, so the
    decision is reset on the way in and out."""
    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)
        compilation_cache.reset_cache()


def save(directory: Path, program, lowered, compiled) -> None:
    """Write `compiled` (the program's train step, lowered as `lowered`, compiled under
    `fresh_compile`) and its manifest."""
    data, _, _ = serialize_executable.serialize(compiled)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / BINARY).write_bytes(data)
    (directory / MANIFEST).write_text(json.dumps(manifest(program, lowered), indent=1) + "\n")


def load(directory: str, program):
    """The saved step, loaded onto the program's devices; ExecutableMismatch where it is not this
    run's program."""
    path = Path(directory)
    source = f"compiled_step={directory}"
    try:
        saved = json.loads((path / MANIFEST).read_text())
        data = (path / BINARY).read_bytes()
    except FileNotFoundError as e:
        raise ExecutableMismatch(f"{source}: {e.filename} not found (tttjax.compile --save_executable writes it)") from None
    lowered = program.lower()
    ours = manifest(program, lowered)
    saved.setdefault("compiler_options", {})  # written before the key existed: XLA's defaults
    for key in ("format", "jax", "jaxlib", "platform", "device_kind", "num_devices", "mesh", "batch",
                "compiler_options"):
        if saved.get(key) != ours[key]:
            raise ExecutableMismatch(f"{source}: compiled for {key} {saved.get(key)}, this run has {ours[key]}")
    if saved["program_sha256"] != ours["program_sha256"]:
        raise ExecutableMismatch(f"{source}: compiled from another program than this run's (the config, model or "
                                 f"shardings changed since it was written): compile it again")
    in_tree = jax.tree_util.tree_flatten(lowered.args_info)[1]
    return serialize_executable.deserialize_and_load(data, in_tree, lowered.out_tree,
                                                    backend=ours["platform"],
                                                    execution_devices=list(program.mesh.devices.flat))
