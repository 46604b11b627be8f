"""Writing files so that a crash, a kill or a full disk never leaves a half-written file under its final name.

Everything samadapt writes for a user to keep (labels, reports, adapters, caches, datasets) goes through here: the
content goes to a temporary name in the same folder (same file system, so the rename is atomic), then
``os.replace`` puts it in place. The temporary name ends with the final name, so writers that pick a format by
suffix (NIfTI, NRRD, PNG) behave the same.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _partial_name(path: Path) -> Path:
    return path.with_name(f".partial-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}-{path.name}")


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file, then rename it to ``path`` (parents are created).

    On any error the temporary file is removed and ``path`` keeps its old content (or stays absent).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


@contextmanager
def atomic_folder(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``path``, renamed to ``path`` when the block succeeds and removed when it fails.

    ``replace``: an existing ``path`` is replaced (e.g. an outdated cache); otherwise it must be absent or empty.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        if path.exists():
            if replace:
                shutil.rmtree(path)
            else:
                path.rmdir()  # empty (checked by the caller); a non-empty one raises rather than being lost
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (hex digest)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
