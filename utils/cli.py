"""The exit policy of every script: a bad command line or input is one line and exit code 2."""

import argparse
import sys
from collections.abc import Callable

import torch

from logger import log_to_file
from utils import dist
from utils.errors import UserError, last_words


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line and exit code 2 (no usage dump)."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_main(main: Callable[[], int | None]) -> None:
    """Run `main`; a UserError or an interrupt becomes one line on stderr and a non-zero exit."""
    try:
        code = main()
    except UserError as e:
        code = report(f"error: {last_words(e)}", e.exit_code)
    except OSError as e:  # a full disk, a read-only folder, a file gone: anywhere outside checkpoint writes
        code = report(f"error: {e.filename or 'I/O'}: {e.strerror or e}", 1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    except Exception as e:  # the Interrupted of a graceful stop carries its own exit code
        if not hasattr(e, "exit_code"):
            raise
        code = report(str(e), e.exit_code)
    if dist.is_distributed():
        torch.distributed.destroy_process_group()
    sys.exit(code or 0)


def report(message: str, code: int) -> int:
    """One line on stderr and in the run's log (cut short: a message may quote a value of any size)."""
    message = message if len(message) <= 2000 else f"{message[:2000]}..."
    print(message, file=sys.stderr)
    try:
        log_to_file(message)
    except OSError:  # the log's own disk may be what failed
        pass
    return code
