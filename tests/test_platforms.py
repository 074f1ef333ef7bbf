"""tttjax/platforms.py: the command lines start libtpu only where it serves (issue 29.4).

* The rules of `select_platforms`, with the host's devices and libtpu faked (in process).
* `has_tpu` / `has_gpu` on fake sysfs and /dev trees (Google's PCI vendor id, /dev/accel*, /dev/vfio/N).
* Real subprocesses, without JAX_PLATFORMS, on this TPU-less host with libtpu installed: a bare JAX
  process maps libtpu (the control: what every command did before), a command line
  (`conversion.to_pytorch`) maps no libtpu, holds no lock and prints none of its start-up lines;
  `tttjax.compile` compiles for a TPU topology while another process holds /tmp/libtpu_lockfile, and
  a user's explicit ALLOW_MULTIPLE_LIBTPU_LOAD=0 still wins (the one-line refusal).
* Every command line's main() calls select_platforms first (read from the source).
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import micro
import pytest

from tttjax import platforms

REPO = Path(__file__).resolve().parents[1]
LOCKFILE = Path("/tmp/libtpu_lockfile")
LIBTPU_LINES = ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "libtpu", "InitGoogle")
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (.ci/run installs it)")
needs_no_tpu = pytest.mark.skipif(platforms.has_tpu() or platforms.has_gpu(), reason="this host has an accelerator")


@pytest.fixture
def env(monkeypatch):
    """A process environment whose JAX platform settings the test chooses; jax.config is restored."""
    import jax

    before = jax.config.jax_platforms
    for name in ("JAX_PLATFORMS", "ALLOW_MULTIPLE_LIBTPU_LOAD"):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    jax.config.update("jax_platforms", before)


@pytest.mark.parametrize("libtpu,tpu,gpu,compile_,want,allow", [
    (True, False, False, False, "cpu", None),    # the case of issue 29.4: libtpu on a CPU host
    (True, True, False, False, None, None),      # a TPU VM: JAX's search takes the TPU
    (True, False, True, False, None, None),      # a GPU host: JAX's search finds the GPU plugin
    (False, False, False, False, None, None),    # no libtpu: nothing to keep off
    (True, True, False, True, "cpu", "1"),       # tttjax.compile beside a training on a TPU VM
    (False, False, True, True, "cpu", "1"),
])
def test_rules(env, libtpu, tpu, gpu, compile_, want, allow):
    import jax

    env.setattr(platforms.importlib.util, "find_spec", lambda name: object() if libtpu else None)
    env.setattr(platforms, "has_tpu", lambda: tpu)
    env.setattr(platforms, "has_gpu", lambda: gpu)
    platforms.select_platforms(for_tpu_compile=compile_)
    assert os.environ.get("JAX_PLATFORMS") == want
    assert os.environ.get("ALLOW_MULTIPLE_LIBTPU_LOAD") == allow
    if want:
        assert jax.config.jax_platforms == want


@pytest.mark.parametrize("user,allow", [("cpu", "1"), ("tpu", None), ("tpu,cpu", None), ("", None)])
def test_the_users_jax_platforms_wins(env, user, allow):
    env.setattr(platforms, "has_tpu", lambda: False)
    env.setenv("JAX_PLATFORMS", user)
    platforms.select_platforms()
    assert os.environ["JAX_PLATFORMS"] == user and "ALLOW_MULTIPLE_LIBTPU_LOAD" not in os.environ
    # A compile whose platforms may open this host's TPU must keep libtpu's lock on it.
    platforms.select_platforms(for_tpu_compile=True)
    assert os.environ["JAX_PLATFORMS"] == user and os.environ.get("ALLOW_MULTIPLE_LIBTPU_LOAD") == allow
    env.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "0")
    platforms.select_platforms(for_tpu_compile=True)
    assert os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] == "0"


def test_device_detection_on_fake_hosts(tmp_path):
    def host(name, files):
        root = tmp_path / name
        for path, text in files.items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(text)
        return str(root)

    pci = "sys/bus/pci/devices/0000:00:0{}.0/vendor"
    cpu_only = host("cpu", {pci.format(4): "0x1af4\n", pci.format(5): "0x8086\n", "dev/vfio/vfio": ""})
    assert not platforms.has_tpu(cpu_only) and not platforms.has_gpu(cpu_only)
    assert platforms.has_tpu(host("pci", {pci.format(4): "0x1af4\n", pci.format(5): "0x1ae0\n"}))
    assert platforms.has_tpu(host("accel", {"dev/accel0": ""}))
    assert platforms.has_tpu(host("vfio", {"dev/vfio/vfio": "", "dev/vfio/0": ""}))  # v5p / v6e
    assert platforms.has_gpu(host("nvidia", {"dev/nvidiactl": ""}))


def _lockfile_holders() -> set[int]:
    try:
        inode = LOCKFILE.stat().st_ino
    except FileNotFoundError:
        return set()
    return {int(f[4]) for f in (line.split() for line in Path("/proc/locks").read_text().splitlines())
            if len(f) > 5 and f[5].rsplit(":", 1)[-1] == str(inode)}


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "ALLOW_MULTIPLE_LIBTPU_LOAD")}
    return {**env, "PYTHONPATH": str(REPO), **extra}


# Runs a module as `python -m` does, then reports its libtpu state at exit from inside the process.
_PROBE = """
import json, os, runpy, sys
sys.argv = sys.argv[1:]
code = 0
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
maps = open("/proc/self/maps").read()
print("PROBE " + json.dumps({"code": code, "mapped": "libtpu.so" in maps, "pid": os.getpid(),
                             "locks": [l for l in open("/proc/locks") if l.split()[4] == str(os.getpid())]}))
"""


@needs_libtpu
@needs_no_tpu
def test_a_cpu_command_never_starts_libtpu(tmp_path):
    import torch_reference as ref

    from tttjax.checkpoint.model_dir import save_model
    from tttjax.model.config import from_lm_kwargs
    from tttjax.model.moshi import create_model

    # The control: JAX's own search on this host starts libtpu.
    bare = subprocess.run([sys.executable, "-c", "import jax; jax.process_index(); "
                           "print('libtpu.so' in open('/proc/self/maps').read())"],
                          env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert bare.stdout.split()[-1] == "True", bare.stderr

    save_model(tmp_path / "ckpt", create_model(from_lm_kwargs(ref.lm_kwargs()), seed=0))
    run = subprocess.run([sys.executable, "-c", _PROBE, "conversion.to_pytorch", "--checkpoint_dir",
                          str(tmp_path / "ckpt"), "--out", str(tmp_path / "export")],
                         env=_clean_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    probe = json.loads(run.stdout.split("PROBE ")[-1])
    assert probe["code"] == 0 and (tmp_path / "export" / "consolidated.safetensors").is_file(), run.stderr
    assert probe["mapped"] is False and probe["locks"] == []
    assert not [line for line in run.stderr.splitlines() if any(s in line for s in LIBTPU_LINES)], run.stderr


@needs_libtpu
def test_compile_runs_beside_a_process_holding_libtpu(tmp_path):
    # The holder: JAX's own search, as every command started libtpu before, taking the lockfile.
    holder = subprocess.Popen([sys.executable, "-c", "import jax, sys; jax.devices(); print('up', flush=True); "
                               "sys.stdin.read()"], env=_clean_env(JAX_PLATFORMS=""), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "up"
        deadline = time.monotonic() + 10
        while not _lockfile_holders() and time.monotonic() < deadline:  # another user's lock serves as well
            time.sleep(0.2)
        assert _lockfile_holders(), "nothing holds /tmp/libtpu_lockfile"
        args = micro.cli(mesh__data=1, mesh__fsdp=-1, batch_size=8, duration_sec=1.28)
        command = [sys.executable, "-m", "tttjax.compile", *args, "--topology=v5e:2x2", "--no_eval"]
        run = subprocess.run(command, env=_clean_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
        assert run.returncode == 0, run.stderr
        assert run.stdout.rstrip().endswith("fits")
        assert _lockfile_holders()  # the holder keeps its lock: the compile never took it
        # A user's explicit ALLOW_MULTIPLE_LIBTPU_LOAD=0 wins: libtpu refuses, in one line.
        refused = subprocess.run(command, env=_clean_env(ALLOW_MULTIPLE_LIBTPU_LOAD="0"), capture_output=True,
                                 text=True, timeout=300, cwd=REPO)
        assert refused.returncode == 1
        assert refused.stderr.splitlines()[-1] == (
            "error: v5e-4: another process holds libtpu (/tmp/libtpu_lockfile): wait for it to end, or set "
            "ALLOW_MULTIPLE_LIBTPU_LOAD=1 to compile beside it")
        assert "Traceback" not in refused.stderr
    finally:
        holder.kill()
        holder.wait()


# Every command line that may start a JAX backend runs through tttjax.cli.run, which selects first.
COMMAND_LINES = ("tttjax/main.py", "tttjax/compile.py", "tttjax/forward.py", "tttjax/generate.py", "tttjax/verify.py",
                 "tttjax/eval/__main__.py", "tttjax/eval/long_context.py", "tttjax/data/prepare.py",
                 "tttjax/data/offline.py", "conversion/from_pytorch.py", "conversion/to_pytorch.py",
                 "conversion/moshi_server.py", "launch/local.py", "launch/slurm.py", "launch/tpu_pod.py")


@pytest.mark.parametrize("path", COMMAND_LINES)
def test_every_command_line_selects_platforms_first(path):
    import ast

    tree = ast.parse((REPO / path).read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    [statement] = main.body
    call = ast.unparse(statement.value)
    assert isinstance(statement, ast.Return) and call.startswith("cli.run("), path
    assert ("for_tpu_compile=True" in call) == (path == "tttjax/compile.py")
    run = next(n for n in ast.parse((REPO / "tttjax" / "cli.py").read_text()).body
               if isinstance(n, ast.FunctionDef) and n.name == "run")
    first = [n for n in run.body if not isinstance(n, ast.Expr) or not isinstance(n.value, ast.Constant)][1]
    assert ast.unparse(first) == "select_platforms(for_tpu_compile=for_tpu_compile)"
