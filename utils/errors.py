class UserError(Exception):
    """A mistake in the user's input (config, command line, files): reported as one line, exit code 2."""

    exit_code = 2


class TrainingError(UserError):
    """A run that cannot go on (non-finite loss, unwritable checkpoint): one line, exit code 1."""

    exit_code = 1
