"""Reading checkpoint files and loading them strictly.

A missing, unexpected or mis-shaped tensor is an error that names it. The only exceptions are the documented resizes
for another input size (absolute position embedding, global relative-position tables), which are returned and
logged, never silent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from samadapt.errors import CheckpointError, InputNotFoundError
from samadapt.files import file_sha256  # noqa: F401  (its home was here: importers keep working)
from samadapt.models.vit import resize_pos_embed, resize_rel_pos

log = logging.getLogger(__name__)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat state dict (unwrapping ``model`` / ``state_dict`` containers)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}: {error}") from error
    for container in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(container), dict):
            state = state[container]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return state


def load_checkpoint(
    model: nn.Module, path: str | Path, allow_missing: Callable[[str], bool] = lambda key: False
) -> list[str]:
    """Load ``path`` into ``model`` strictly; return the names of tensors resized for another input size.

    ``allow_missing`` names model tensors that a base checkpoint cannot have (e.g. adapter weights).
    """
    state = read_state_dict(path)
    try:
        return load_state_dict_strict(model, state, allow_missing)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None


def load_state_dict_strict(
    model: nn.Module, state: dict[str, torch.Tensor], allow_missing: Callable[[str], bool] = lambda key: False
) -> list[str]:
    """``load_state_dict`` that fails loudly, except for the documented position-table resizes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not allow_missing(k)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            "checkpoint does not fit the model (wrong architecture?): "
            + _key_summary("missing", missing)
            + _key_summary("unexpected", unexpected)
        )
    state = dict(state)
    resized = []
    for key, value in state.items():
        target = own[key].shape
        if value.shape == target:
            continue
        if key.endswith("pos_embed") and value.dim() == 4:
            state[key] = resize_pos_embed(value.float(), target[1]).to(value.dtype)
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and value.dim() == 2 and value.shape[1] == target[1]:
            state[key] = resize_rel_pos(value.float(), target[0]).to(value.dtype)
        else:
            raise CheckpointError(f"tensor {key} has shape {tuple(value.shape)}, the model needs {tuple(target)}")
        resized.append(key)
    if resized:
        log.info("resized for the input size: %s", ", ".join(resized))
    model.load_state_dict(state, strict=False)
    return resized


def _key_summary(kind: str, keys: list[str], shown: int = 5) -> str:
    if not keys:
        return ""
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{len(keys)} {kind} tensor(s): {', '.join(keys[:shown])}{more}. "
