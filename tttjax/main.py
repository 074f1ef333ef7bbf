"""Train: `python -m tttjax.main --config=configs/tiny.py [--config.a.b=v ...]`.

A thin launcher (big_vision style): the config file (Python, a run's args.yaml or a
moshi-finetune YAML) decides everything; unknown keys fail. Re-running the same command resumes
from the run's latest checkpoint. `--help` lists every key with its comment.
"""

from __future__ import annotations

import sys

from tttjax.host_malloc import reexec_with_huge_pages

if __name__ == "__main__":
    reexec_with_huge_pages()  # before JAX is imported: the process executes itself again once

from absl import logging  # noqa: E402

from configs import base  # noqa: E402
from tttjax import run_config  # noqa: E402
from tttjax.platforms import select_platforms  # noqa: E402
from tttjax.checkpoint import CheckpointError, RunDirError  # noqa: E402
from tttjax.train.loop import Trainer, TrainingError  # noqa: E402

USAGE = "usage: python -m tttjax.main --config=configs/x.py|x.yaml [--config.a.b=v ...]"


def _help(spec: str | None, overrides) -> str:
    """The usage line and every key of `spec` (default configs/base.py) with its value and comment."""
    if spec is None:
        config, source = base.get_config(), "configs/base.py"
    else:
        config, source = run_config.load(spec, overrides), spec
    return f"{USAGE}\n\nconfig keys of {source} (--config.KEY=VALUE overrides any):\n{run_config.describe_keys(config)}"


def main(argv=None) -> int:
    select_platforms()
    argv = sys.argv[1:] if argv is None else argv
    try:
        spec, overrides, rest = run_config.split_config_args(argv)
        if "--help" in rest or "-h" in rest:
            print(_help(spec, overrides))
            return 0
        if rest:
            hint = f" (config keys are set as --config.{rest[0][2:]}=VALUE)" if rest[0].startswith("--") else ""
            raise run_config.ConfigError(f"unexpected arguments {rest}{hint}; {USAGE}")
        if spec is None:
            raise run_config.ConfigError(f"--config is required; {USAGE}")
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
