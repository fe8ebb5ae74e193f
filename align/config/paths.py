"""Where align's files are: conf/ and the recipes (in a checkout or inside a wheel), and the cache of what it
builds on first use (the tiny model, the tasks' data files, merged parents): the folder ALIGN_CACHE names, else
~/.cache/align. Nothing heavy is imported here: `--help` reads these without torch or Hydra."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align"))


def config_dir() -> Path:
    """conf/ in a source checkout or editable install; align/conf in a wheel."""
    package = Path(__file__).resolve().parent.parent  # align/
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"align's conf/ directory was not found next to {package}")


def recipe_dirs() -> list[Path]:
    """The shipped recipes (recipes/ in a checkout, align/recipe_files in a wheel), then ./recipes/ of the working
    directory (a later folder's recipe wins over a shipped one of the same name)."""
    package = Path(__file__).resolve().parent.parent  # align/
    dirs = [d for d in (package.parent / "recipes", package / "recipe_files") if d.is_dir()][:1]
    local = Path.cwd() / "recipes"
    if local.is_dir() and all(local.resolve() != d.resolve() for d in dirs):
        dirs.append(local)
    return dirs
