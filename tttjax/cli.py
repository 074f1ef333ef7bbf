"""The one boundary of every command line: how errors reach the terminal, and the shared flags.

`run(main, argv)` calls a CLI's `main(argv) -> exit code` and turns what the user can act on into
one line on stderr and an exit code: a `UserError` (`error: <message>`, its `exit_code`), an
`OSError` (the file system or the environment: exit 1), an out-of-memory from XLA (exit 1, with
what to change), Ctrl-C (exit 130). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import jax

from tttjax.errors import INTERRUPTED, UserError, is_out_of_memory
from tttjax.model.config import ATTENTION_IMPLS, DEFAULT_ATTENTION_IMPL
from tttjax.platforms import select_platforms


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def error(message: str) -> None:
    """An `error:` line on stderr."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)


def run(main: Callable[[list[str]], int], argv: list[str] | None = None, *, for_tpu_compile: bool = False) -> int:
    """`main(argv)` (default: sys.argv[1:]), with the project's errors as one line and an exit code;
    JAX's platforms are chosen first (tttjax/platforms.py; `for_tpu_compile`: tttjax.compile's rule)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    select_platforms(for_tpu_compile=for_tpu_compile)
    try:
        return main(argv)
    except UserError as e:
        error(str(e))
        return e.exit_code
    except OSError as e:
        error(str(e))
        return 1
    except jax.errors.JaxRuntimeError as e:
        if not is_out_of_memory(e):
            raise
        error(f"out of memory: {str(e).strip().splitlines()[0]}")
        return 1
    except KeyboardInterrupt:
        error("interrupted (Ctrl-C)")
        return INTERRUPTED


# -- shared flags ---------------------------------------------------------------------------------
def add_checkpoint_dir(parser: argparse.ArgumentParser, help: str = "training step dir or imported checkpoint dir"):
    parser.add_argument("--checkpoint_dir", required=True, help=help)


def add_dtype(parser: argparse.ArgumentParser, default: str | None = None,
              help: str = "compute dtype (default float32)") -> None:
    parser.add_argument("--dtype", default=default, choices=["float32", "bfloat16"], help=help)


def add_attention_impl(parser: argparse.ArgumentParser) -> None:
    """`--attention_impl` of the CLIs that run whole sequences: overrides the checkpoint's setting, so
    the logits of two implementations can be compared on one checkpoint."""
    parser.add_argument("--attention_impl", default=DEFAULT_ATTENTION_IMPL, choices=ATTENTION_IMPLS,
                        help="temporal attention over whole sequences (default auto: splash on TPU, cudnn on "
                             "GPU, blockwise on CPU for long sequences, else xla)")


def add_output_json(parser: argparse.ArgumentParser, help: str = "write the results here as JSON") -> None:
    parser.add_argument("--output_json", default=None, help=help)
