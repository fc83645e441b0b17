"""The exit policy of every script: a bad command line or input is one line and exit code 2."""

import argparse
import sys
from collections.abc import Callable

import torch

from logger import log_to_file
from utils import dist
from utils.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line and exit code 2 (no usage dump)."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_main(main: Callable[[], int | None]) -> None:
    """Run `main`; a UserError or an interrupt becomes one line on stderr and a non-zero exit."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        log_to_file(f"error: {e}")
        code = e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    except Exception as e:  # the Interrupted of a graceful stop carries its own exit code
        if not hasattr(e, "exit_code"):
            raise
        print(str(e), file=sys.stderr)
        log_to_file(str(e))
        code = e.exit_code
    if dist.is_distributed():
        torch.distributed.destroy_process_group()
    sys.exit(code or 0)
