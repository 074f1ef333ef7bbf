"""Train: `python -m tttjax.main --config=configs/tiny.py [--config.a.b=v ...]`.

A thin launcher (big_vision style): the config file decides everything; unknown keys fail.
Re-running the same command resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)",
                                          lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file operation at INFO
    from tttjax.train.loop import Trainer, TrainingError

    try:
        return Trainer(_CONFIG.value).run()
    except (TrainingError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from tttjax.host_malloc import reexec_with_huge_pages

    reexec_with_huge_pages()
    app.run(main)
