"""Checkpoints that survive any crash: written to a temporary folder, sealed with checksums, then renamed into place.

Layout of ``RUN_DIR/checkpoints/``::

    last/        the newest checkpoint      (adapter_model.safetensors, adapter_config.json, trainer_state.pt,
    previous/    the one before it           checksums.json: SHA-256 of every other file, written last)
    best/        the best validation Dice so far

Writing ``last``: the new checkpoint goes to ``.last.tmp/`` (files flushed to disk, ``checksums.json`` last), then
``last`` becomes ``previous`` and ``.last.tmp`` becomes ``last``. A kill at any moment leaves at least one sealed
checkpoint among ``last``, ``.last.tmp`` and ``previous``; ``newest_intact`` finds the newest whose checksums hold,
so a half-written or corrupted file is never loaded. A failed write (disk full, permission denied) leaves the
existing checkpoints as they were.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from samadapt.errors import TrainingError
from samadapt.models.checkpoint import file_sha256

log = logging.getLogger(__name__)

SEAL = "checksums.json"
STATE = "trainer_state.pt"


def _fsync(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def seal(folder: Path, step: int) -> None:
    """Write ``checksums.json`` (the step and the SHA-256 of every file) after flushing the files to disk."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != SEAL)
    for path in files:
        _fsync(path)
    content = {"step": step, "files": {p.name: file_sha256(p) for p in files}}
    (folder / SEAL).write_text(json.dumps(content, indent=2))
    _fsync(folder / SEAL)


def sealed_step(folder: Path) -> int | None:
    """The step of a checkpoint whose files all match their checksums; None for a missing, unsealed or corrupted one."""
    try:
        content = json.loads((folder / SEAL).read_text())
        for name, digest in content["files"].items():
            if file_sha256(folder / name) != digest:
                return None
        return int(content["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class CheckpointStore:
    """The checkpoints of one run directory (``RUN_DIR/checkpoints``)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def save(self, name: str, step: int, write: Callable[[Path], None]) -> Path:
        """``write(folder)`` fills a fresh temporary folder; it is sealed and becomes ``name`` (``last`` keeps its
        predecessor as ``previous``). Errors propagate with the existing checkpoints untouched."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            write(tmp)
            seal(tmp, step)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = self.folder / name
        if name == "last":
            previous, old = self.folder / "previous", self.folder / ".previous.old"
            shutil.rmtree(old, ignore_errors=True)
            if previous.exists():
                previous.rename(old)
            if final.exists():
                final.rename(previous)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            old = self.folder / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        return final

    def newest_intact(self) -> tuple[Path, int] | None:
        """The newest sealed checkpoint to resume from (and its step), warning about any newer one that is damaged."""
        candidates = ["last", ".last.tmp", "previous", ".previous.old"]
        found = []
        for name in candidates:
            folder = self.folder / name
            if not folder.exists():
                continue
            step = sealed_step(folder)
            if step is None:
                if name in ("last", "previous"):
                    log.warning("%s is damaged (checksums do not match, or it is incomplete): skipped", folder)
                continue
            found.append((step, -candidates.index(name), folder))
        if not found:
            return None
        step, _, folder = max(found)
        return folder, step


# -- what a training loop saves and restores (the fine-tuning trainer and the pre-training loop alike) ---------------


def loop_state(loop, **extra) -> dict:
    """Everything an exact resume needs of a loop (``step``, ``optimizer``, ``scheduler``, ``scaler``, ``rng``,
    ``history`` attributes): optimiser moments, schedule position, random streams (numpy, torch, CUDA)."""
    return {
        "step": loop.step,
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(),
        "scaler": loop.scaler.state_dict(),
        "rng": loop.rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "history": loop.history,
        **extra,
    }


def restore_loop_state(loop, folder: Path) -> dict:
    """Load ``folder``'s trainer state into ``loop`` (the inverse of ``loop_state``); returns the state read."""
    state = torch.load(folder / STATE, map_location="cpu", weights_only=False)
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.scheduler.load_state_dict(state["scheduler"])
    loop.scaler.load_state_dict(state["scaler"])
    loop.rng.bit_generator.state = state["rng"]
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    loop.step = state["step"]
    loop.history = state["history"]
    return state


def write_checkpoint(store: CheckpointStore, name: str, step: int, write: Callable[[Path], None]) -> Path:
    """``CheckpointStore.save``, with a failed write (disk full, no permission) turned into a ``TrainingError`` that
    says the earlier checkpoints are intact."""
    try:
        return store.save(name, step, write)
    except OSError as error:
        raise TrainingError(
            f"could not write the {name} checkpoint at step {step} into {store.folder}: {error.strerror or error}; "
            "the run stopped here, earlier checkpoints are intact (resume with --resume once there is room / "
            "permission)"
        ) from error


def checkpoint_to_resume(store: CheckpointStore) -> tuple[Path, int] | None:
    """The newest intact checkpoint, None for a fresh run; a run whose checkpoints are all damaged is an error."""
    found = store.newest_intact()
    if found is None and (store.folder / "last").exists():
        raise TrainingError(f"{store.folder}: no intact checkpoint to resume from (all are damaged)")
    if found is not None and found[0].name != "last":
        log.warning("resuming from %s: the newest checkpoint was incomplete or damaged", found[0])
    return found
