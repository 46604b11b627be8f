"""DataLoader workers that end with the job: ``worker_init_fn=die_with_parent()`` for every loader of a trainer.

A worker whose trainer was killed (kill -9, the out-of-memory killer) would otherwise live on: torch's own check of
its parent runs only between batches, and a worker blocked writing a batch nobody reads never gets there. On Linux
the worker asks the kernel for SIGKILL when its parent ends (``prctl(PR_SET_PDEATHSIG)``); elsewhere a thread checks
the parent every second.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> Callable[[int], None]:
    """A ``worker_init_fn`` that ends the worker when the process creating the loader (this one) ends."""
    return functools.partial(_worker_init, os.getpid())


def _worker_init(parent: int, worker_id: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            _watch(parent)
    else:
        _watch(parent)
    if os.getppid() != parent:  # the parent was gone before the request took effect
        os._exit(1)


def _watch(parent: int) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="samadapt-parent-watch", daemon=True).start()
