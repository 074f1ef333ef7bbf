"""The project's error base class (a problem the user can fix, printed as one line by every CLI),
what counts as XLA's out-of-memory, and the exit codes of an interrupted command and of a process
whose job lost another process.

Every error that names a key, a path, a size or a checkpoint the user gave derives from
`UserError`; `tttjax.cli.run` prints it as `error: <message>` and exits with its `exit_code`.
Anything else is a bug and keeps its traceback. `UserError` is a `ValueError`, so callers that
catch ValueError (and tests that expect one) keep working.
"""

INTERRUPTED = 130  # the exit code of a command stopped by Ctrl-C (a shell's code for SIGINT)
LOST_PROCESS = 75  # another process of the job stopped answering (EX_TEMPFAIL: relaunch the job)


class UserError(ValueError):
    """A problem with the user's input or environment, fixable by them; the message names it."""

    exit_code = 1


class ConfigError(UserError):
    """A config file, a key or an override that cannot be used (exit 2: a usage error)."""

    exit_code = 2


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an error from XLA (compiling or running) is its out-of-memory refusal."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text
