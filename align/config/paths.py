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


def user_object(spec: str | None, key: str, example: str, kind: str):
    """`module:Name` (the value of `key`, e.g. reward.fn) imported from the working directory or PYTHONPATH, or
    ValueError naming the key and the fix. `kind` says what Name is (function, class)."""
    import importlib

    if not spec or ":" not in spec:
        raise ValueError(f"{key} must be module:{kind if kind == 'function' else 'Class'} (e.g. {key}={example}), "
                         f"got {spec!r}")
    module_name, name = spec.split(":", 1)
    working_directory_on_path()
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{key}={spec}: cannot import {module_name!r} ({e}); put {module_name}.py in the working "
                         "directory or on PYTHONPATH") from e
    found = getattr(module, name, None)
    if not callable(found):
        raise ValueError(f"{key}={spec}: {module_name} has no {kind} {name!r}")
    return found


def working_directory_on_path() -> None:
    """Make the user's modules in the working directory importable (reward.fn, env.cls), as `python -m` would."""
    import os
    import sys

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
