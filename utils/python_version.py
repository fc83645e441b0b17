"""Imported first by every script, so that an older Python stops with one line instead of a traceback from deep
inside: it runs before any code an older Python cannot import. Written in what any Python 3 can run. Ctrl-C during
the imports that follow (torch takes seconds) is one line too, until utils.cli.run_main puts Python's handler back."""

import signal
import sys

MINIMUM = (3, 11)  # pyproject.toml's requires-python (a test checks they agree)


def check(version: tuple = sys.version_info) -> None:
    """Exit with one line on stderr when `version` is older than MINIMUM."""
    if version < MINIMUM:
        sys.exit(f"error: this project needs Python {MINIMUM[0]}.{MINIMUM[1]} or newer, not {version[0]}.{version[1]}")


def interrupted(signum, frame) -> None:
    print("error: interrupted", file=sys.stderr)
    sys.exit(130)


check()
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored (a background job)
    signal.signal(signal.SIGINT, interrupted)
