"""Apply a PEFT method to a SAM model from outside, freeze the rest, save and load only what was trained.

The base model is never edited in place beyond filling its empty slots and wrapping linears, so the base state-dict
keys stay the same and a plain checkpoint still loads.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from samadapt.errors import ConfigError, InputNotFoundError, RunError
from samadapt.files import atomic_write, atomic_write_text
from samadapt.models.common import is_empty_slot
from samadapt.peft.config import DEFAULT_TRAIN_MODULES, PeftConfig
from samadapt.peft.depth import inject_depth
from samadapt.peft.lora import LoRALinear
from samadapt.peft.registry import METHODS, PARTS
from samadapt.peft.text_prompt import inject_text_prompt

ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "adapter_config.json"
# a semantic decoder's new modules (models.mask_decoder), zero at first, training whatever the method: the in-plane
# position map and the opt-in slice position (model.slice_position), by their parameters' name prefix
DECODER_PRIORS = {name: f"mask_decoder.{name}." for name in ("position_prior", "slice_prior")}
PEFT_MARKERS = ("lora_A_", "lora_B_", "attn_adapter.", "mlp_adapter.", "depth_branch.", "_adapter.", "text_prompt.")


def is_peft_key(key: str) -> bool:
    """True for state-dict keys that belong to PEFT modules (never in a base checkpoint)."""
    return any(marker in key for marker in PEFT_MARKERS)


def apply_peft(model: nn.Module, config: PeftConfig) -> nn.Module:
    """Insert the method's modules into ``model`` (in place), then freeze all but what the policy trains.

    The base values of the modules trained in full are kept aside (on the CPU, ``model.peft_base_values``), so
    ``disable_adapters`` gives the un-adapted model back without loading it a second time.
    """
    if any(is_peft_key(k) for k in model.state_dict()):
        raise ConfigError("this model already carries PEFT modules; build a fresh base model")
    for part in METHODS[config.method]:
        PARTS[part](model, config)
    if config.depth:
        inject_depth(model, config.adapter.ratio)
    if config.text is not None:  # beside any method: the text-prompt projection (peft.text_prompt)
        inject_text_prompt(model, config.text)
    set_trainable(model, config)
    model.peft_base_values = {
        name: param.detach().to("cpu", copy=True)
        for name, param in model.named_parameters()
        if param.requires_grad and not is_peft_key(name)
    }
    return model


def train_modules(config: PeftConfig) -> list[str]:
    if config.train_modules is not None:
        return list(config.train_modules)
    return DEFAULT_TRAIN_MODULES[config.method]


def set_trainable(model: nn.Module, config: PeftConfig) -> None:
    """Freeze everything, then unfreeze PEFT parameters and the policy's module prefixes."""
    prefixes = tuple(train_modules(config))
    known = {name for name, _ in model.named_modules()} | {name for name, _ in model.named_parameters()}
    for prefix in prefixes:
        if prefix not in known:
            raise ConfigError(f"train_modules names {prefix!r}, which is not a module of this model")
    for name, param in model.named_parameters():
        param.requires_grad = (
            is_peft_key(name) or name.startswith(prefixes) or name.startswith(tuple(DECODER_PRIORS.values()))
        )


def train_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, except that batch norms with nothing to train keep their running statistics (eval)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.eval()
    return model


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor (PEFT weights and fully trained modules), by its path in the model."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def parameter_report(model: nn.Module) -> list[dict]:
    """Trainable and total parameters per top-level module, plus a total row."""
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, param in model.named_parameters():
        top = name.split(".")[0]
        rows[top][1] += param.numel()
        rows[top][0] += param.numel() if param.requires_grad else 0
    table = [{"module": k, "trainable": v[0], "total": v[1]} for k, v in rows.items()]
    table.append(
        {"module": "total", "trainable": sum(v[0] for v in rows.values()), "total": sum(v[1] for v in rows.values())}
    )
    for row in table:
        row["percent"] = 100.0 * row["trainable"] / max(row["total"], 1)
    return table


def format_parameter_report(model: nn.Module) -> str:
    lines = [f"{'module':16s} {'trainable':>12s} {'total':>12s} {'%':>7s}"]
    for row in parameter_report(model):
        lines.append(f"{row['module']:16s} {row['trainable']:12,d} {row['total']:12,d} {row['percent']:7.2f}")
    return "\n".join(lines)


def merge_lora(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.merge()


def unmerge_lora(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.unmerge()


def save_adapter(model: nn.Module, directory: str | Path, manifest: dict) -> Path:
    """Write the trained tensors (safetensors) and the manifest (JSON) into ``directory``, atomically.

    ``manifest`` must hold at least ``base_model``, ``base_sha256`` and ``peft`` (a ``PeftConfig.to_dict()``).
    """
    for key in ("base_model", "base_sha256", "peft"):
        if key not in manifest:
            raise ValueError(f"adapter manifest needs {key!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if any(isinstance(m, LoRALinear) and m.merged for m in model.modules()):
        raise RuntimeError("un-merge LoRA before saving: merged weights would be saved twice")
    if getattr(model, "peft_blend", 1.0) != 1.0:
        raise RuntimeError("set_blend(model, 1.0) before saving: a blended model would save blended weights")
    tensors = trainable_state_dict(model)
    atomic_write(directory / ADAPTER_WEIGHTS, lambda path: save_file(tensors, str(path)))
    atomic_write_text(directory / MANIFEST, json.dumps({**manifest, "tensors": len(tensors)}, indent=2, sort_keys=True))
    return directory


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise InputNotFoundError(f"{path} not found: not an adapter directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RunError(f"{path} is not valid JSON: {error}") from error


def saved_decoder_priors(directory: str | Path) -> set[str]:
    """Which of ``DECODER_PRIORS`` a saved semantic adapter holds: runs saved before the position map have none,
    runs without ``model.slice_position`` no ``slice_prior``; the model is rebuilt with exactly those."""
    from safetensors import safe_open

    with safe_open(str(Path(directory) / ADAPTER_WEIGHTS), framework="pt") as file:
        names = file.keys()  # a safetensors handle lists its tensors without reading them
    return {prior for prior, prefix in DECODER_PRIORS.items() if any(n.startswith(prefix) for n in names)}


def load_adapter_weights(model: nn.Module, directory: str | Path, base_sha256: str) -> dict:
    """Load saved tensors into a model already built with the manifest's PEFT config; returns the manifest.

    Raises:
        ValueError: the manifest's base model checksum differs from ``base_sha256``, a tensor does not fit, or a
            trainable tensor of the model is missing from the file.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest["base_sha256"] != base_sha256:
        raise RunError(
            f"{directory / MANIFEST}: adapter was trained on base weights {manifest['base_sha256'][:12]}..., "
            f"the model given has {base_sha256[:12]}...; load it onto the same base model ({manifest['base_model']})"
        )
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    own = dict(model.named_parameters())
    for key, value in tensors.items():
        if key not in own:
            raise RunError(f"{directory / ADAPTER_WEIGHTS}: tensor {key} has no place in this model")
        if own[key].shape != value.shape:
            raise RunError(
                f"{directory / ADAPTER_WEIGHTS}: {key} is {tuple(value.shape)}, model has {tuple(own[key].shape)}"
            )
    missing = sorted(key for key, param in own.items() if param.requires_grad and key not in tensors)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise RunError(
            f"{directory / ADAPTER_WEIGHTS}: {len(missing)} trained tensors of this PEFT configuration are missing "
            f"({', '.join(missing[:3])}{more}): the file is incomplete or belongs to another configuration"
        )
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)
    return manifest


def empty_slots(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if is_empty_slot(m))
