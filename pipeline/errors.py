"""The one exception type for problems a user can fix (bad input, bad flags, a mismatched cache).

The CLI prints its message on one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """A user-facing error: the message names the file, line or field and says what to do."""

    exit_code = 1


class ConfigError(PipelineError):
    """One or more problems in flags or a config file, reported together."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))
