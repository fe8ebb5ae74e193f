"""Content fingerprints of a stage's inputs: its data files and a local base model.

Part of a stage's identity (handoff.config_hash), so editing a data file in place re-trains the stage
and everything downstream, while touching it (same bytes) does not. Files are hashed by content;
files over HASH_LIMIT (model weights) by name, size and modification time, so a 15 GB checkpoint
is not read at every start. A hub name is its own fingerprint (with `model.revision` for models):
pin a revision to make a hub input reproducible.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

HASH_LIMIT = 256 * 2**20  # bytes: larger files are identified by size and mtime
_CACHE: dict[tuple, str] = {}


def _file(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        if st.st_size > HASH_LIMIT:
            _CACHE[key] = f"size={st.st_size},mtime={st.st_mtime_ns}"
        else:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(2**20), b""):
                    h.update(block)
            _CACHE[key] = h.hexdigest()[:16]
    return _CACHE[key]


def of_path(spec: str | None) -> str | None:
    """A local file's or folder's content fingerprint; None for what is not a local path (a hub name)."""
    if not spec:
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        return _file(path)
    if path.is_dir():
        h = hashlib.sha256()
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                file = Path(root) / name
                h.update(f"{file.relative_to(path)}={_file(file)};".encode())
        return h.hexdigest()[:16]
    return None


def inputs(cfg) -> dict:
    """What the stage reads besides its parents: data sources and a local base model, by content."""

    from align.data.loader import bundled_folder, is_bundled

    out = {}
    for key in ("train", "eval"):
        spec = cfg.data.get(key)
        if is_bundled(spec):
            out[f"data.{key}"] = of_path(bundled_folder(spec, cfg.data))
        elif spec:
            out[f"data.{key}"] = of_path(spec) or f"hub:{spec}"
    name = cfg.model.name_or_path
    local = of_path(name)
    out["model"] = local or f"{name}@{cfg.model.revision or 'main'}"
    env = cfg.get("env")
    if env is not None and env.kind != "none":  # editing the environment's code re-runs the stage
        from align.config.registry import reads_env
        from align.envs import module_file

        if reads_env(cfg.stage.name):
            code = module_file(env.cls)
            out["env"] = _file(Path(code)) if code else env.cls
    return out
