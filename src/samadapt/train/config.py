"""One configuration object per training run, serialised as YAML next to the run's outputs.

Every CLI flag maps onto a field; ``--set section.key=value`` reaches any field. Values are checked against the field's
type (so ``--set train.grad_checkpointing=False`` is False, not the string "False"), and an unknown key is an error
that names it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from samadapt.errors import ConfigError, InputNotFoundError
from samadapt.files import atomic_write_text
from samadapt.peft.config import AdapterConfig, LoRAConfig, PeftConfig
from samadapt.peft.text_prompt import TextPromptConfig
from samadapt.precision import PRECISIONS

TASKS = ("prompt", "semantic")
PROMPTS = ("point", "box", "mixed", "text", "text+point", "text+box", "text-mixed")


@dataclass
class ModelConfig:
    """name: a model of ``samadapt info``; checkpoint: weights file (default: found by name); img_size: input side;
    init: a pre-training run (``samadapt pretrain``) whose encoder PEFT parameters this run starts from;
    slice_position: semantic task only, the decoder also reads each slice's position along its volume's axis
    (``data.position``): for atlas-aligned or same-field-of-view data only (off: across scans with other fields of
    view a position means other anatomy)."""

    name: str = "lite_medsam"
    checkpoint: str | None = None
    img_size: int | None = None
    init: str | None = None
    slice_position: bool = False


@dataclass
class DataConfig:
    """Where the slices come from and which of them train.

    Attributes:
        path: dataset directory (MSD / nnU-Net layout or images/ + masks/).
        axis: slicing axis of the (Z, Y, X) volumes.
        classes: class ids to learn (None: all foreground classes of dataset.json).
        exemplars: train on this many labelled slices only (Cheap Lunch selection); None uses every labelled slice.
        val_cases: number of cases held out for validation (taken from the training list, seeded).
        synthetic: a synthesised set (``samadapt synth``) trained on alongside the exemplars, or None.
        synthetic_size: with ``synthesize_on_the_fly``, the number of synthetic slices to make.
        synthetic_share: when synthetic slices train too, the probability that a draw takes one of them (the rest
            draw from the real exemplars and target-free slices, so that a large synthetic set never drowns them).
        augment: augment training slices: prompted task, random flips and 90-degree rotations; semantic task,
            orientation-preserving small affine and intensity changes (``samadapt.train.augment``).
        workers: DataLoader worker processes reading training slices from disk (0: read in the training process).
    """

    path: str = ""
    axis: int = 0
    classes: list[int] | None = None
    exemplars: int | None = None
    val_cases: int = 1
    synthetic: str | None = None
    synthesize_on_the_fly: bool = False
    synthetic_size: int = 200
    synthetic_share: float = 0.5
    augment: bool = True
    workers: int = 2


@dataclass
class PromptConfig:
    """How prompts are simulated in training (prompt task only).

    Attributes:
        kind: ``point``, ``box`` or ``mixed`` (drawn per object per step: a box with probability ``box_share``,
            else the clicks); with text (``docs/text_prompts.md``): ``text`` (a phrase naming the target),
            ``text+point`` / ``text+box`` (a phrase together with the clicks / box), ``text-mixed`` (each step one
            of text, point, box, text+point).
        box_share: with ``mixed``, the probability that an object is prompted by its box.
        multimask: a prompt of one click alone trains SAM's three candidate masks, the loss on the best one per
            object and the IoU head on all three (SAM's practice), as ``Predictor`` answers one click with the
            candidate of highest predicted IoU; off: the single-mask output learns every click.
        points: clicks per object in the first round (random pixels of the object).
        iterative_rounds: extra decoder-only rounds, each adding a click in the error region (MSA).
        box_jitter: maximum shift of each box side in pixels of the original slice.
        objects: ``class`` (one object per class per slice) or ``instance`` (per connected component).
        phrases: a YAML file of the user's phrases per class (``samadapt.text.phrases``); None: generated ones.
        text_groups: share of text draws that use a phrase naming several classes (target: the union).
    """

    kind: str = "point"
    box_share: float = 0.5
    multimask: bool = False
    points: int = 1
    iterative_rounds: int = 0
    box_jitter: int = 5
    objects: str = "class"
    phrases: str | None = None
    text_groups: float = 0.25

    @property
    def uses_text(self) -> bool:
        return self.kind.startswith("text")


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int = 10
    poly_power: float = 0.9
    final_lr_ratio: float = 0.01


@dataclass
class LossConfig:
    """ce / dice: weights of the mask loss terms; iou: weight of the IoU head's MSE against the true IoU of the
    predicted mask (prompted task, as SAM trains it), so that ``Prediction.scores`` keep their meaning."""

    ce: float = 1.0
    dice: float = 1.0
    iou: float = 1.0


@dataclass
class TrainLoopConfig:
    """steps: optimiser steps; batch_size per process; grad_accum: micro-batches per step; precision: auto (bf16 where
    the device computes it natively, else fp32) / fp32 / bf16 (CPU and CUDA autocast) / fp16 (CUDA, with a gradient
    scaler); val_every: steps between validations (0: only at the end);
    val_slices: how many held-out slices validation uses; depth_slices: slices per stack for 3D (msa-3d);
    device: auto (CUDA when available, else CPU), cpu, cuda or cuda:N; checkpoint_every / checkpoint_minutes: a
    checkpoint (checkpoints/last, the one before kept as checkpoints/previous) every so many steps (0: only at
    validations and the end) and at least every so many minutes."""

    steps: int = 200
    batch_size: int = 4
    grad_accum: int = 1
    precision: str = "auto"
    grad_checkpointing: bool = False
    val_every: int = 50
    val_slices: int = 16
    depth_slices: int = 1
    seed: int = 0
    log_every: int = 10
    max_grad_norm: float | None = 1.0
    device: str = "auto"
    checkpoint_every: int = 50
    checkpoint_minutes: float = 10.0


@dataclass
class TrainConfig:
    recipe: str = "cheap-lunch"
    task: str = "prompt"
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)

    def __post_init__(self) -> None:
        _check_choice("task", self.task, TASKS)
        _check_choice("prompt.kind", self.prompt.kind, PROMPTS)
        _check_choice("prompt.objects", self.prompt.objects, ("class", "instance"))
        _check_choice("train.precision", self.train.precision, PRECISIONS)
        _check_choice("optim.name", self.optim.name, ("adamw", "sgd"))
        if not 0.0 <= self.data.synthetic_share <= 1.0:
            raise ConfigError(f"data.synthetic_share must be in [0, 1], got {self.data.synthetic_share}")
        if not 0.0 <= self.prompt.box_share <= 1.0:
            raise ConfigError(f"prompt.box_share must be in [0, 1], got {self.prompt.box_share}")
        if self.task == "semantic" and self.peft.blend != 1.0:
            raise ConfigError("peft.blend applies to prompted runs; a semantic decoder has no base to blend with")
        if self.model.slice_position and self.task != "semantic":
            raise ConfigError("model.slice_position needs task=semantic: a prompted run reads no slice position")
        if self.prompt.uses_text:
            if self.task == "semantic":
                raise ConfigError(f"prompt.kind={self.prompt.kind} needs the prompt task, not task=semantic")
            if self.peft.text is None:  # text prompts train their projection beside the recipe's parameters
                self.peft.text = TextPromptConfig()
        if self.train.steps < 1 or self.train.batch_size < 1 or self.train.grad_accum < 1:
            raise ConfigError("train.steps, train.batch_size and train.grad_accum must be >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def from_dict(cls: type, data: dict, where: str = "") -> typing.Any:
    """Build dataclass ``cls`` from nested dicts; unknown keys are errors naming the full key."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section {where or '<root>'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{where}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}; known keys here: {', '.join(sorted(names))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, f"{full}.")
        else:
            kwargs[key] = coerce(value, hint, full)
    return cls(**kwargs)


def coerce(value: typing.Any, hint: typing.Any, key: str) -> typing.Any:
    """Check (and gently convert) a value against a field's type hint."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} needs a list, got {value!r}")
        inner = typing.get_args(hint)[0]
        items = [coerce(v, inner, key) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} needs true or false, got {value!r}")
        return value
    if hint in (int, float):
        try:
            converted = hint(yaml.safe_load(value) if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key {key!r} needs a number, got {value!r}") from None
        if hint is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"config key {key!r} needs an integer, got {value!r}")
        return converted
    if hint is str:
        return str(value)
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings to a nested dict (values parsed by YAML, checked later by type)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set needs key=value, got {item!r}")
        key, raw = item.split("=", 1)
        set_key(data, key, yaml.safe_load(raw) if raw != "" else "")
    return data


def set_key(data: dict, key: str, value: typing.Any) -> None:
    """Set ``section.key`` of a nested config dict to ``value`` (checked later by type); unknown keys are errors."""
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"unknown config key {key!r}: {part!r} is not a section")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"unknown config key {key!r}")
    node[parts[-1]] = value


def merge(base: dict, update: dict, where: str = "") -> dict:
    """Recursively merge a YAML file's dict into the recipe defaults; unknown keys are errors."""
    for key, value in update.items():
        if key not in base:
            raise ConfigError(f"unknown config key {where + key!r}")
        if isinstance(base[key], dict) and isinstance(value, dict):
            merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = value
    return base


def read_yaml(path: str | Path) -> dict:
    """A YAML config file as a dict (empty file: {}).

    Raises:
        InputNotFoundError: no such file. ConfigError: not valid YAML.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: config file not found")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error


def layered_config(
    cls: type,
    defaults: dict,
    config_file: str | Path | None = None,
    flags: typing.Mapping[str, typing.Any] | None = None,
    sets: typing.Sequence[str] | None = None,
) -> typing.Any:
    """THE way a run's configuration is assembled (``samadapt train`` / ``pretrain``, the demo, the app's adapt):
    ``defaults`` (a recipe's: ``train.recipes.recipe_defaults`` / ``pretrain.config.pretrain_defaults``), then the
    YAML ``config_file``, then the caller's ``flags`` (``section.key`` -> value, as given; None skipped), then
    ``--set`` strings (``section.key=value``, parsed as YAML); last wins, and ``cls`` checks every value by type.
    ``defaults`` is updated in place."""
    data = defaults
    if config_file:
        merge(data, read_yaml(config_file))
    for key, value in (flags or {}).items():
        if value is not None:
            set_key(data, key, value)
    apply_overrides(data, list(sets or []))
    return from_dict(cls, data)


def load_config(path: str | Path) -> TrainConfig:
    """Read a run's ``config.yaml``."""
    return from_dict(TrainConfig, read_yaml(path))


__all__ = [
    "AdapterConfig",
    "DataConfig",
    "LoRAConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "PeftConfig",
    "PromptConfig",
    "TrainConfig",
    "TrainLoopConfig",
    "apply_overrides",
    "from_dict",
    "layered_config",
    "load_config",
    "merge",
    "set_key",
]
