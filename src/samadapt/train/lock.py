"""One job per run directory: an exclusive lock on ``RUN_DIR/.lock``.

The lock is an ``fcntl.flock`` on the file, which the operating system releases when its process ends in any way
(kill -9 included), so a stale lock from a dead job never blocks: the next job simply takes it. The file records the
holder's process id and host so that a refused job can say who holds the directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from samadapt.errors import RunDirectoryBusyError


class RunLock:
    """``with RunLock(run_dir): ...`` holds the directory for this process, or raises ``RunDirectoryBusyError``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._handle = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _read_holder(handle.read())
            handle.close()
            raise RunDirectoryBusyError(
                f"{self.path.parent} is in use by process {holder.get('pid', '?')} on host {holder.get('host', '?')} "
                f"(since {holder.get('since', '?')}); wait for it to finish, or use another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        handle.write(json.dumps(holder))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(text: str) -> dict:
    try:
        holder = json.loads(text)
        return holder if isinstance(holder, dict) else {}
    except ValueError:
        return {}
