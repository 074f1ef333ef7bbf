"""Train: `python -m tttjax.main --config=configs/tiny.py [--config.a.b=v ...]`.

A thin launcher (big_vision style): the config file decides everything; unknown keys fail.
Re-running the same command resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import sys

from tttjax.host_malloc import reexec_with_huge_pages

if __name__ == "__main__":
    reexec_with_huge_pages()  # before JAX is imported: the process executes itself again once

from absl import logging  # noqa: E402

from tttjax import run_config  # noqa: E402
from tttjax.checkpoint import CheckpointError, RunDirError  # noqa: E402
from tttjax.train.loop import Trainer, TrainingError  # noqa: E402

USAGE = "usage: python -m tttjax.main --config=configs/x.py [--config.a.b=v ...]"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        spec, overrides, rest = run_config.split_config_args(argv)
        if rest:
            raise run_config.ConfigError(f"unexpected arguments {rest}\n{USAGE}")
        if spec is None:
            raise run_config.ConfigError(f"--config is required\n{USAGE}")
        config = run_config.load(spec, overrides)
    except run_config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file operation at INFO
    try:
        return Trainer(config).run()
    except (TrainingError, CheckpointError, RunDirError, ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
