"""`conversion.to_pytorch --out`: only into a new or empty directory, and nothing left behind by a
failed or interrupted export (issue 29.1).

* A directory holding other files, or an export, is refused in one line and left as it was; the
  `.partial` leftover of an export killed outright (SIGKILL, power loss) is the one thing replaced.
* A failure while streaming the tensors or writing config.json removes everything the export wrote.
* SIGINT and SIGTERM sent to a real `python -m conversion.to_pytorch` in the middle of its file (its
  writer paused after three tensors, so that the signal lands mid-write every time) end it with
  one line and status 128 + signal, and leave an empty --out that a re-run fills.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch_reference as ref

from conversion.to_pytorch import main as to_pytorch_main
from tttjax.weights import export as export_module

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tttjax.checkpoint.model_dir import save_model
    from tttjax.model.config import from_lm_kwargs
    from tttjax.model.moshi import create_model

    path = tmp_path_factory.mktemp("model") / "ckpt"
    save_model(path, create_model(from_lm_kwargs(ref.lm_kwargs()), seed=0))
    return path


def export(model_dir, out) -> int:
    return to_pytorch_main(["--checkpoint_dir", str(model_dir), "--out", str(out)])


def test_out_must_be_new_or_empty(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    assert export(model_dir, out) == 1
    assert capsys.readouterr().err == f"error: {out} is not empty (data, notes.txt): choose a new or empty --out\n"
    assert sorted(p.name for p in out.iterdir()) == ["data", "notes.txt"] and (out / "notes.txt").read_text() == "mine"

    done = tmp_path / "done"
    assert export(model_dir, done) == 0
    before = {p.name: p.stat().st_mtime_ns for p in done.iterdir()}
    assert export(model_dir, done) == 1
    assert capsys.readouterr().err.endswith(f"error: {done} already holds an export; choose a new --out\n")
    assert {p.name: p.stat().st_mtime_ns for p in done.iterdir()} == before

    # The leftover of an export killed outright is the one thing replaced; an empty directory is fine.
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "consolidated.safetensors.partial").write_bytes(b"\0" * 100)
    assert export(model_dir, killed) == 0
    assert sorted(p.name for p in killed.iterdir()) == ["config.json", "consolidated.safetensors"]
    (tmp_path / "empty").mkdir()
    assert export(model_dir, tmp_path / "empty") == 0


@pytest.mark.parametrize("where", ["tensors", "config.json"])
def test_a_failed_export_removes_what_it_wrote(model_dir, tmp_path, capsys, monkeypatch, where):
    if where == "tensors":
        real, calls = export_module.Export._torch_value, []

        def failing(self, row):
            calls.append(row.name)
            if len(calls) == 4:
                raise OSError(28, "No space left on device")
            return real(self, row)

        monkeypatch.setattr(export_module.Export, "_torch_value", failing)
    else:
        def failing(directory, config):
            (Path(directory) / "config.json").write_text("{")  # half written
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(export_module, "write_config_json", failing)
    out = tmp_path / "out"
    assert export(model_dir, out) == 1
    assert capsys.readouterr().err == "error: [Errno 28] No space left on device\n"
    assert list(out.iterdir()) == []
    monkeypatch.undo()
    assert export(model_dir, out) == 0  # the directory is usable again


# `python -m conversion.to_pytorch` whose writer says MIDWAY and waits after its third tensor.
_PAUSED = """
import runpy, sys, time
from tttjax.weights import safetensors_io
real = safetensors_io.SafetensorsWriter.write
def write(self, name, array):
    real(self, name, array)
    if self._next == 3:
        self._file.flush()
        print("MIDWAY", flush=True)
        time.sleep(120)
safetensors_io.SafetensorsWriter.write = write
sys.argv = ["to_pytorch"] + sys.argv[1:]
runpy.run_module("conversion.to_pytorch", run_name="__main__")
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_write_leaves_no_partial_file(model_dir, tmp_path, signum):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED, "--checkpoint_dir", str(model_dir), "--out", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "MIDWAY", proc.stderr.read()
        partial = out / "consolidated.safetensors.partial"
        assert partial.is_file() and partial.stat().st_size > 8  # the header and three tensors are on disk
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum, err
    assert err == (f"error: interrupted by {signum.name}: no export written to {out} (no partial file left)\n")
    assert list(out.iterdir()) == []
    assert export(model_dir, out) == 0
