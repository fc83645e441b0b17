"""The kinds of error a user sees as one line (utils/cli.run_main), and how a message becomes one line."""

import re


class UserError(Exception):
    """A mistake in the user's input (config, command line, files): reported as one line, exit code 2."""

    exit_code = 2


class TrainingError(UserError):
    """A run that cannot go on (non-finite loss, unwritable checkpoint): one line, exit code 1."""

    exit_code = 1


class SampleError(UserError):
    """A sample the dataset cannot read (a damaged file), named by its index and file; a trainer saves, then stops.
    Raised in a DataLoader worker, it comes to the main process as a SampleError with the worker's traceback."""


def one_line(error: BaseException) -> str:
    """An error's message on one line. An error raised in a DataLoader worker arrives wrapped in the worker's
    traceback ('Caught X in DataLoader worker process 0. Original Traceback ...'); its last line says it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    if len(lines) > 1 and lines[1].startswith("Original Traceback"):
        return re.sub(r"^[\w.]+: ", "", lines[-1])
    return " ".join(lines)
