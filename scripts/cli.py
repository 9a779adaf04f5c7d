"""Command-line plumbing the scripts share: a bad value is one line on stderr, exit status 2."""

from __future__ import annotations

import argparse
import sys


class ArgumentError(ValueError):
    """A bad command-line value: reported as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose own errors (unknown flag, missing value) are one line too, no usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ArgumentError(message)


def refuse(prog: str, error: ArgumentError) -> int:
    """Report ``error`` as ``PROG: error: ...`` on stderr; the exit status of a refused command."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2
