"""A task's data files, written on first use into the cache and read from there after.

The folder's name carries a hash of the generator's source, so an edited generator writes a new folder; the
files are written into a hidden temporary folder and renamed into place, so a process never reads half a task
(several ranks may ask at once: one rename wins, the others find the folder complete)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from align.config.paths import cache_root


def generated(name: str, write: Callable[[Path], None], *sources: str) -> Path:
    """The folder of task `name`'s files; `write(folder)` makes them, `sources` (the generator modules' files) key
    the folder."""
    version = hashlib.sha256(b"".join(Path(s).read_bytes() for s in sources)).hexdigest()[:12]
    target = cache_root() / "tasks" / f"{name}-{version}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not another process's complete folder: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
