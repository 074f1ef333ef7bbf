"""Shared pieces of the launchers: argument splitting and shell quoting."""

from __future__ import annotations

import shlex
import sys
from typing import Sequence

from tttjax.errors import UserError


def split_args(argv: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(launcher args, training args): everything after the first `--` goes to tttjax.main."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def quote(args: Sequence[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def train_command(python: str, train_args: Sequence[str], module: str = "tttjax.main") -> list[str]:
    if module == "tttjax.main" and not any(a.startswith("--config=") or a == "--config" for a in train_args):
        raise UserError("training arguments need --config=configs/<name>.py (after `--`)")
    return [python, "-m", module, *train_args]
