"""The on-disk names (docs/contract.md §6) and what a weights path on disk is.

Every name of the run directory, of a step directory's items, of a model directory and of a
PyTorch export lives here, and so does the one answer to "what is this path?" (`weights_kind`).

    runs/exp/args.yaml                                   the resolved run config (a record)
    runs/exp/run.lock                                    the writer's lock (host and pid)
    runs/exp/checkpoints/checkpoint_000100/state|data|consolidated
    runs/exp/eval/long_context/step_000100/...           an evaluation's files (evals.*)
    runs/exp/checkpoints.broken/checkpoint_000200        a step that did not restore, moved aside
    runs/exp/checkpoints.superseded/after_000100/...     later steps of a resume from step 100
    LOCAL_DIR/exp-1a2b3c4d/process_0-of-2/checkpoints/... one process's local copies (checkpoint.local_dir)
    MODEL_DIR/config.json + MODEL_DIR/params/            a tttjax model dir (conversion.from_pytorch)
    EXPORT_DIR/consolidated.safetensors | lora.safetensors + config.json
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import yaml

from tttjax.errors import UserError

ARGS_FILE = "args.yaml"
LOCK_FILE = "run.lock"
LOGS = "logs"
EVALS = "eval"
CHECKPOINTS = "checkpoints"
BROKEN = "checkpoints.broken"  # steps that did not restore (never deleted, never counted by retention)
SUPERSEDED = "checkpoints.superseded"  # later steps set aside by a resume from an earlier step
STEP_PREFIX = "checkpoint"
STEP_DIGITS = 6
STATE, DATA, CONSOLIDATED, DIGESTS = "state", "data", "consolidated", "digests"  # the items of a step dir
DATA_FILE = "position.json"  # the data item's file
PARAMS_DIR = "params"  # a model dir's Orbax params
CONFIG_FILE = "config.json"  # moshi LM config + lora keys + "ttt" block (model dirs and exports)
FULL_FILE = "consolidated.safetensors"
ADAPTERS_FILE = "lora.safetensors"
EXPORT_FILES = (FULL_FILE, ADAPTERS_FILE)

STEP, MODEL, PYTORCH = "step", "model", "pytorch"  # the kinds of weights path
KINDS_HELP = ("a training step dir (runs/x/checkpoints/checkpoint_NNNNNN, with state/), a tttjax model dir "
              f"({CONFIG_FILE} + {PARAMS_DIR}/, from conversion.from_pytorch) or a PyTorch .safetensors file")


def checkpoints_dir(run_dir) -> Path:
    return Path(run_dir).absolute() / CHECKPOINTS


def step_dir(run_dir, step: int) -> Path:
    """`<run_dir>/checkpoints/checkpoint_NNNNNN`: the committed directory of `step`."""
    return checkpoints_dir(run_dir) / f"{STEP_PREFIX}_{step:0{STEP_DIGITS}d}"


def step_number(step: Path) -> int:
    """The step of a step dir (`checkpoint_000100` -> 100)."""
    return int(Path(step).name.removeprefix(f"{STEP_PREFIX}_"))


def evals_dir(run_dir) -> Path:
    """Where the evaluations during training write their files (one dir per type, then per step)."""
    return Path(run_dir).absolute() / EVALS


def broken_dir(run_dir) -> Path:
    return Path(run_dir).absolute() / BROKEN


def superseded_dir(run_dir, resumed_step: int) -> Path:
    """Where a resume from `resumed_step` moves the run's later steps."""
    return Path(run_dir).absolute() / SUPERSEDED / f"after_{resumed_step:0{STEP_DIGITS}d}"


def local_root(local_dir, run_dir, process: int, count: int) -> Path:
    """Where process `process` of `count` keeps its local copies of `run_dir`'s steps (a run dir of its
    own: checkpoints/, checkpoints.broken/, ...). The name carries a hash of run_dir's path, so runs
    sharing one local_dir never mix, and the process count, so a job of another size finds none."""
    run_dir = Path(run_dir).absolute()
    tag = hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]
    return Path(local_dir).absolute() / f"{run_dir.name}-{tag}" / f"process_{process}-of-{count}"


def unused_name(path: Path) -> Path:
    """`path`, or `path.1`, `path.2`, ... : the first that does not exist (set-aside dirs never overwrite)."""
    candidate, n = Path(path), 0
    while candidate.exists():
        n += 1
        candidate = Path(f"{path}.{n}")
    return candidate


def run_dir_of(step: Path) -> Path:
    """The run directory a step dir belongs to."""
    return Path(step).absolute().parent.parent


def weights_kind(path) -> str:
    """STEP, MODEL or PYTORCH; FileNotFoundError naming the path and the accepted forms otherwise."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return PYTORCH
    if (path / STATE).is_dir():
        return STEP
    if (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir():
        return MODEL
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory or weights file (expected {KINDS_HELP})")
    raise FileNotFoundError(f"{path}: neither a training step dir ({STATE}/) nor a model dir ({CONFIG_FILE} + "
                            f"{PARAMS_DIR}/) nor a PyTorch .safetensors file")


def read_json(path: Path) -> dict:
    """A JSON object from `path`; one-line errors naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def error_summary(error: BaseException, limit: int = 300) -> str:
    """One line for an error from Orbax / TensorStore / the OS: the innermost cause (which names the
    file or array), its first line, at most `limit` characters."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    text = " ".join(str(error).strip().splitlines()[:1]) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def check_output_file(path, flag: str) -> None:
    """Refuses an output file that cannot be written (one line naming `flag`, the path and the errno),
    before any work is done; the file is not left behind."""
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
        if not existed:
            os.unlink(path)
    except OSError as e:
        raise UserError(f"{flag}={path}: cannot write it ([Errno {e.errno}] {e.strerror})") from None


def check_output_dir(path, flag: str) -> None:
    """As `check_output_file`, for an output directory (created if missing)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise UserError(f"{flag}={path}: cannot write there ([Errno {e.errno}] {e.strerror})") from None


def write_config_json(directory: Path, config: dict) -> None:
    """config.json of a model dir or an export."""
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(config, indent=4, sort_keys=True))


def find_export(directory: Path) -> Path | None:
    """The safetensors file of a step dir's consolidated/ export, if exactly one is there."""
    found = [Path(directory) / CONSOLIDATED / n for n in EXPORT_FILES if (Path(directory) / CONSOLIDATED / n).is_file()]
    return found[0] if len(found) == 1 else None


def write_run_config(run_dir: Path, config: dict, start: int) -> Path:
    """args.yaml of a run; a resume with another config keeps the old file as args.before_step_N.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    args = run_dir / ARGS_FILE
    text = yaml.safe_dump(config, sort_keys=True)
    if start and args.exists() and args.read_text() != text:
        args.rename(run_dir / f"args.before_step_{start:06d}.yaml")
    args.write_text(text)
    return args
