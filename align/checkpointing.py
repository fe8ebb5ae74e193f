"""Checkpoints that are either complete or ignored.

A checkpoint folder counts only once its commit marker is written (atomically, after every rank has
finished writing its files). Resume takes the newest committed one; a folder a crash left half
written is never picked. Old checkpoints are deleted only after a newer one is committed, keeping
the newest `train.keep_checkpoints`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

COMMITTED = "align_committed.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def step_of(path: Path) -> int | None:
    m = _STEP.match(path.name)
    return int(m.group(1)) if m else None


def checkpoints(folder: Path) -> list[Path]:
    """checkpoint-N folders, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def is_committed(path: Path) -> bool:
    return (path / COMMITTED).is_file()


def latest(folder: Path) -> Path | None:
    done = [p for p in checkpoints(folder) if is_committed(p)]
    return done[-1] if done else None


def commit(path: Path, info: dict | None = None) -> None:
    """Mark a fully written checkpoint as complete (write-then-rename: the marker is whole or absent)."""
    tmp = path / f".{COMMITTED}.tmp"
    with open(tmp, "w") as f:
        json.dump({"step": step_of(path), **(info or {})}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / COMMITTED)


def commit_when_all_written(path: Path, keep: int, main: bool, info: dict | None = None) -> None:
    """After every rank has written its part of `path`: commit it and rotate (main process), then
    let the ranks go on. A collective: every rank calls it."""
    from align import distributed

    distributed.barrier()  # every rank's shards are on disk
    if main and path.is_dir():
        commit(path, info)
        rotate(path.parent, keep)
    distributed.barrier()


def rotate(folder: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` committed checkpoints, and unfinished ones older than the newest
    committed (a crash's leftovers). Returns what was deleted."""
    done = [p for p in checkpoints(folder) if is_committed(p)]
    if not done:
        return []
    newest = step_of(done[-1])
    keep_set = set(done[-max(keep, 1):])
    doomed = [p for p in checkpoints(folder) if p not in keep_set and step_of(p) <= newest]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed
