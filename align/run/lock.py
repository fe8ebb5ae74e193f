"""One writer per stage directory: a second run of the same `run.name`/stage refuses to start.

An exclusive `flock` on `<stage dir>/.lock`, held from the start of the stage until its commit.
The kernel drops it when the holder exits, however it exits (crash, SIGKILL), so there are no stale
locks to clean up; the file only says who holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from align.run.handoff import HandoffError

LOCK_FILE = ".lock"
_HELD: dict[str, int] = {}  # path -> fd: this process's locks (re-entrant: a stage that raised and is re-run in-process)


class StageLocked(HandoffError):
    pass


class StageLock:
    def __init__(self, stage_dir: Path):
        self.path = Path(stage_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> StageLock:
        key = str(self.path.resolve())
        if key in _HELD:
            self.fd = _HELD[key]
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise StageLocked(
                f"{self.path.parent} is being written by another run (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, since {holder.get('since', '?')}: {holder.get('command', '?')}). "
                "Nothing was changed. Wait for it to finish, stop it, or use another run.name; the lock goes "
                "away by itself when that process exits") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                  "command": " ".join(sys.argv)[:300]}).encode(), 0)
        self.fd = _HELD[key] = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            release_held(self.path.parent)  # acquire() registered the fd there
            self.fd = None


def release_held(stage_dir: Path) -> None:
    """Drop this process's lock on `stage_dir`, if it holds one."""
    fd = _HELD.pop(str((Path(stage_dir) / LOCK_FILE).resolve()), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
