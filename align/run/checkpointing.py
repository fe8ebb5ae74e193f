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
ASIDE = ".checkpoints.old"  # beside checkpoints/: a re-run's predecessors, kept until it commits its first one
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


def within_budget(folder: Path) -> Path | None:
    """The newest committed checkpoint that still has training left to do. The Trainer resumed from one
    saved at its last step would train one step past train.max_steps; an older one (or none: start over)
    reaches the same weights, since resume is exact."""
    for path in reversed([p for p in checkpoints(folder) if is_committed(p)]):
        state = path / "trainer_state.json"
        if not state.is_file():
            return path  # not a Trainer checkpoint (PPO's own loop stops at its budget)
        info = json.loads(state.read_text())
        if info.get("global_step", 0) < info.get("max_steps", 0):
            return path
    return None


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
    from align.models import distributed
    distributed.barrier()  # every rank's shards are on disk
    if main and path.is_dir():
        commit(path, info)
        rotate(path.parent, keep)
        shutil.rmtree(path.parent.parent / ASIDE, ignore_errors=True)  # the new run has a checkpoint of its own
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
