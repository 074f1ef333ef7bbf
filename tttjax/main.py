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

from tttjax import cli  # noqa: E402
from tttjax.config import reader  # noqa: E402
from tttjax.config.schema import key_paths  # noqa: E402
from tttjax.errors import ConfigError  # noqa: E402
from tttjax.train.loop import Trainer  # noqa: E402
from tttjax.train.watchdog import Watchdog  # noqa: E402

USAGE = "usage: python -m tttjax.main --config=configs/x.py|x.yaml [--config.a.b=v ...]"


def _unexpected(rest: list[str]) -> ConfigError:
    """The error of arguments that are not --config ones; `--max_steps=3` hints --config.max_steps=3."""
    name, _, value = rest[0].removeprefix("--").partition("=")
    hint = ""
    if rest[0].startswith("--"):
        key = name if name in key_paths() else reader.suggest_key(name)
        hint = f" (config keys are set as --config.{key or name}={value or 'VALUE'})"
    return ConfigError(f"unexpected arguments {rest}{hint}; {USAGE}")


def _main(argv: list[str]) -> int:
    spec, overrides, rest = reader.split_config_args(argv)
    if "--help" in rest or "-h" in rest:
        print(f"{USAGE}\n\n{reader.help_text(spec, overrides)}")
        return 0
    if rest:
        raise _unexpected(rest)
    if spec is None:
        raise ConfigError(f"--config is required; {USAGE}")
    config = reader.load(spec, overrides)
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file operation at INFO
    with Watchdog(config.checkpoint.stop_timeout_s, config.distributed.heartbeat_timeout_s) as watchdog:
        return Trainer(config, watchdog).run()


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
