"""One job per run directory: an exclusive lock on ``RUN_DIR/.lock`` that lives and dies with the job's process.

The lock is an ``fcntl.flock`` on the file, which the operating system releases when the last descriptor of it is
closed, so a killed job (kill -9 included) leaves no stale lock. A ``flock`` belongs to the open file, which a forked
child (a DataLoader worker) would share and keep locked after its parent died; so every child forked by this
process closes its copy at once (``os.register_at_fork``), and the lock stays the job's alone. (A POSIX record lock,
not inherited across fork, would also drop the lock whenever any code of the process closed any descriptor of the
file, and would not refuse a second lock taken by the same process.) The file records the holder's process id and
host so that a refused job can say who holds the directory, and whether that process is still running.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO

from samadapt.errors import RunDirectoryBusyError
from samadapt.runs import RunLayout

# the open lock files of this process (by id): closed in every forked child
_HELD: dict[int, IO[str]] = {}


def _close_in_child() -> None:
    # only the child's descriptors close: without LOCK_UN the parent's lock stays in place
    for handle in list(_HELD.values()):
        handle.close()
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """``with RunLock(run_dir): ...`` holds the directory for this process, or raises ``RunDirectoryBusyError``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = RunLayout(Path(run_dir)).lock
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _read_holder(handle.read())
            handle.close()
            raise RunDirectoryBusyError(busy_message(self.path, holder)) from None
        handle.seek(0)
        handle.truncate()
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        handle.write(json.dumps(holder))
        handle.flush()
        self._handle = handle
        _HELD[id(handle)] = handle

    def release(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            _HELD.pop(id(handle), None)
            if not handle.closed:  # closed: this is a forked child, which never held the lock
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
                handle.close()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def busy_message(path: Path, holder: dict) -> str:
    """Why ``path`` (a run's lock file) is refused: who holds it, and whether that process still runs."""
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    where = f"{path.parent} is in use by process {pid} on host {host} (since {holder.get('since', '?')})"
    if host != socket.gethostname() or not isinstance(pid, int) or _running(pid):
        return f"{where}; wait for it to finish, or use another --out"
    # the recorded job is gone, yet the lock is held: by processes that share its lock file (children of an older
    # samadapt, or of the job's own libraries), or by a job on another machine sharing the folder
    others = [p for p in _processes_with_open(path) if p != os.getpid()]
    who = f"processes {', '.join(map(str, others))} still hold it" if others else "another process holds it"
    return (
        f"{where}: process {pid} is no longer running, but {who}; end {'them' if others else 'it'} "
        f"(e.g. kill {' '.join(map(str, others)) or 'PID'}), or use another --out"
    )


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:  # an unreaped child counts as ended
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _processes_with_open(path: Path) -> list[int]:
    """Process ids with a descriptor on ``path`` (Linux ``/proc``; empty elsewhere or where not readable)."""
    target = os.path.realpath(path)
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if any(os.readlink(fd) == target for fd in (entry / "fd").iterdir()):
                found.append(int(entry.name))
        except OSError:
            continue
    return sorted(found)


def _read_holder(text: str) -> dict:
    try:
        holder = json.loads(text)
        return holder if isinstance(holder, dict) else {}
    except ValueError:
        return {}
