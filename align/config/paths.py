"""Where align keeps what it builds on first use (the tiny model, the tasks' data files, merged parents): the
folder ALIGN_CACHE names, else ~/.cache/align."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align"))
