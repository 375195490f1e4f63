"""Ownership of a run directory: one live run per ``<output_dir>/<name>/``.

Rank 0 holds ``<run_dir>/.lock`` (host, pid, SLURM job) for the whole run. A second run of the
same directory is refused in one line naming the holder; a lock whose process is gone (same
host) or that belongs to this very SLURM job (a requeued job runs again under its id) is stale
and taken over.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

LOCK = ".lock"


class RunDirBusy(RuntimeError):
    """Another live run holds the run directory; the message is one line."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID")}


def _stale(holder: dict) -> bool:
    me = _me()
    if holder.get("job") and holder.get("job") == me["job"]:
        return True
    return holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1)))


class RunLock:
    """``with RunLock(run_dir):`` holds the lock; raises :class:`RunDirBusy` if a live run has it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text() or "{}")
                except (OSError, json.JSONDecodeError):
                    holder = {}
                if not _stale(holder):
                    raise RunDirBusy(
                        f"run.name: {self.path.parent} is in use by pid {holder.get('pid', '?')} on "
                        f"{holder.get('host', '?')}; pick another run.name, or delete {self.path} if no run uses it"
                    ) from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_me(), f)
            self.held = True
            return
        raise RunDirBusy(f"run.name: could not take {self.path} (another run is starting in it)")

    def release(self) -> None:
        if self.held:
            try:
                if json.loads(self.path.read_text()).get("pid") == os.getpid():
                    self.path.unlink()
            except (OSError, json.JSONDecodeError):
                pass
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
