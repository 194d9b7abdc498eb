"""The command line's exit codes and its one error printer, shared by `cli.py` and
`distill/apps/sample_cli.py`: 0 done, 1 failed while working, 2 a usage or recipe error (one line on
stderr, nothing written)."""

from __future__ import annotations

import sys

EXIT_FAILED, EXIT_USAGE = 1, 2


def fail(message: str, code: int = EXIT_USAGE) -> int:
    """Print ``error: message`` on stderr and return ``code``, the command's exit status."""
    print(f"error: {message}", file=sys.stderr)
    return code
