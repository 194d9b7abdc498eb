"""Where the project keeps what it builds once and reuses (toy teachers, toy data, caches)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SITDISTILL_CACHE"


def cache_dir(*parts: str) -> Path:
    """`$SITDISTILL_CACHE/...` or `~/.cache/sitdistill/...` (not created here)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "sitdistill")
    return Path(root, *parts)
