"""Imported first by every script, so that an older Python stops with one line instead of a traceback from deep
inside: it runs before any code an older Python cannot import. Written in what any Python 3 can run."""

import sys

MINIMUM = (3, 11)  # pyproject.toml's requires-python (a test checks they agree)


def check(version: tuple = sys.version_info) -> None:
    """Exit with one line on stderr when `version` is older than MINIMUM."""
    if version < MINIMUM:
        sys.exit(f"error: this project needs Python {MINIMUM[0]}.{MINIMUM[1]} or newer, not {version[0]}.{version[1]}")


check()
