"""The one exception type for a user's mistake.

A UserError is printed as a single line (`zeroconv <command>: error: <message>`) with exit code 2 and no
traceback. Its message names the file, flag or column at fault and says how to fix it. Anything else that
escapes is a bug in zeroconv and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: bad flag, missing file, unknown column. Message says how to fix it."""


# Exit codes, documented in the README.
EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM: a checkpoint of the current step was written, resume with `latest`.
EXIT_NONFINITE = 3  # too many non-finite steps in a row; the last good state was checkpointed.
