"""The toy teachers' cache folders: content keys, atomic writes, the finished marker.

A build writes into a sibling temporary folder and renames it into place only when it succeeded,
with the finished marker (`FINISHED_MARKER`, holding the settings) written last inside it; a folder
without the marker is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

FINISHED_MARKER = "toy_teacher.json"  # written last inside the temporary folder, before the rename


def cache_key(payload: dict, version: str) -> str:
    text = json.dumps({"version": version, **payload}, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_cache_root() -> Path:
    try:
        from sitdistill.core.paths import cache_dir
        return Path(cache_dir())
    except ImportError:
        return Path(os.environ.get("SITDISTILL_CACHE", os.path.expanduser("~/.cache/sitdistill")))


class atomic_dir:
    """Write into a sibling temporary folder; rename it to ``final`` only when the block succeeds.

    An existing ``final`` is replaced (a half-written one left by an older, non-atomic copy included).
    On an exception the temporary folder is removed and ``final`` is left as it was.
    """

    def __init__(self, final: Path):
        self.final = Path(final)

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.partial-", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        return False


def is_finished(folder: str | Path) -> bool:
    """A build is finished when its marker and pipeline index exist (both are written before the rename)."""
    folder = Path(folder)
    return (folder / FINISHED_MARKER).is_file() and (folder / "model_index.json").is_file()
