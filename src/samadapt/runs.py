"""The run directory: its layout, its typed manifest, and rebuilding the adapted model from it alone.

Layout (``RunLayout``), written by ``samadapt train``::

    RUN_DIR/config.yaml                      the full TrainConfig
    RUN_DIR/checkpoints/{best,last,previous}/ adapter_model.safetensors + adapter_config.json (the manifest)
                                             (+ trainer_state.pt, checksums.json: train/checkpoints.py)
    RUN_DIR/metrics.csv, loss_curve.png      training log
    RUN_DIR/warnings.json                    collapse warnings (all-background plateau), when any
    RUN_DIR/exemplars.json                   the labelled slices the run learnt from (case, slice index)
    RUN_DIR/.lock, tensorboard/              the writing job's lock; TensorBoard logs (optional)

``load_run`` also accepts a bare model name (e.g. ``lite_medsam``): the un-adapted model. ``baseline`` gives the model
a run was adapted from: the same model with its adapters off where that is exact, else the base checkpoint the
manifest names (checksum verified).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from samadapt.accel import accelerate
from samadapt.device import resolve_device
from samadapt.errors import ConfigError, InputNotFoundError, RunError
from samadapt.models.checkpoint import file_sha256
from samadapt.models.registry import MODELS, build_model, default_weights_path
from samadapt.models.sam import Sam
from samadapt.peft import (
    PeftConfig,
    apply_peft,
    current_blend,
    disable_adapters,
    load_adapter_weights,
    read_manifest,
    saved_decoder_priors,
    set_blend,
)
from samadapt.peft.config import DEFAULT_TRAIN_MODULES
from samadapt.peft.inject import ADAPTER_WEIGHTS
from samadapt.peft.pretrained import PretrainedInitError, load_encoder_peft
from samadapt.precision import INFERENCE_PRECISION
from samadapt.selection import DEFAULT_ONE_CLICK, one_click_best, trained_masks

if TYPE_CHECKING:
    from samadapt.data.dicom_terms import Algorithm

# bump when a field changes meaning; older manifests are upgraded by Manifest.from_dict
# 2: ``outputs`` (which mask outputs and whether the IoU head trained) and ``prompt.multimask``
MANIFEST_SCHEMA = 2


@dataclass(frozen=True)
class RunLayout:
    """Where each file of a run directory lives; the trainer writes and ``load_run`` reads through it."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, name: str) -> Path:
        """``best``, ``last`` or ``previous``: an adapter folder (weights + manifest)."""
        return self.checkpoints / name

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def loss_curve(self) -> Path:
        return self.root / "loss_curve.png"

    @property
    def warnings(self) -> Path:
        return self.root / "warnings.json"

    @property
    def exemplars(self) -> Path:
        return self.root / "exemplars.json"

    @property
    def lock(self) -> Path:
        """The lock file of the one job writing the run (``train.lock.RunLock``)."""
        return self.root / ".lock"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def final_checkpoint(self) -> str:
        """The checkpoint a finished run is used from: ``best`` when there is one, else ``last``."""
        return "best" if self.checkpoint("best").is_dir() else "last"


IOU_HEAD = "mask_decoder.iou_prediction_head"


def trained_outputs(task: str, prompt: dict | None, peft: dict, iou_loss: float = 1.0) -> dict:
    """What a run's training taught, for its manifest's ``outputs``: ``masks`` (``selection.trained_masks``: single,
    multimask or semantic) and ``iou_head`` (a prompted run whose IoU head trained in full, ``peft.train_modules`` or
    the method's default, with a non-zero ``loss.iou``)."""
    modules = peft.get("train_modules")
    if modules is None:
        modules = DEFAULT_TRAIN_MODULES.get(peft.get("method", ""), [])
    head = any(IOU_HEAD == m or IOU_HEAD.startswith(m + ".") for m in modules)
    return {"masks": trained_masks(task, prompt), "iou_head": task != "semantic" and head and iou_loss > 0}


@dataclass
class Manifest:
    """What a saved adapter needs to be used the way it was trained (``adapter_config.json``).

    Attributes:
        base_model / base_checkpoint / base_sha256: the base model; an adapter only loads onto the same weights.
        peft: ``PeftConfig.to_dict()``.
        task: ``prompt`` (a mask per prompted object) or ``semantic`` (K + 1 class masks, no prompt).
        classes: class id -> name, for the classes the model segments.
        preprocessing / axis: the dataset's intensity preset and slicing axis the model was trained on.
        img_size: the model's input size. precision: the training precision (``auto`` resolves per device).
        prompt: the prompt kind, objects mode and multimask setting of training. recipe: the recipe's name.
        outputs: what training taught (``trained_outputs``): ``masks`` single / multimask / semantic and ``iou_head``;
            it decides how one click is answered (``selection.one_click_best``). Derived when not given.
        step / val_dice: of the checkpoint. extra: entries this version does not know (kept as they are).
        text: text-prompted runs (``docs/text_prompts.md``): the sentence encoder and the phrase book
            (``samadapt.text.phrases.PhraseBook.to_dict``); None otherwise.
    """

    base_model: str
    base_sha256: str
    peft: dict
    base_checkpoint: str = ""
    task: str = "prompt"
    classes: dict[int, str] = field(default_factory=dict)
    preprocessing: str = ""
    axis: int | None = None
    img_size: int | None = None
    precision: str = "fp32"
    prompt: dict = field(default_factory=dict)
    recipe: str = ""
    step: int | None = None
    val_dice: float | None = None
    text: dict | None = None
    outputs: dict = field(default_factory=dict)
    schema_version: int = MANIFEST_SCHEMA
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.outputs:
            self.outputs = trained_outputs(self.task, self.prompt, self.peft)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["classes"] = {str(k): v for k, v in self.classes.items()}
        return {**data.pop("extra"), **data}

    @classmethod
    def from_dict(cls, data: dict, where: str | Path = "manifest", run_config: dict | None = None) -> Manifest:
        """Read a manifest written by any version up to this one (schema 0: before versioning).

        Before schema 2 the manifest did not say which outputs trained: they are derived from the run's
        ``config.yaml`` when given as ``run_config`` (``prompt.multimask``, ``loss.iou``), else from the defaults of
        those versions (``prompt.multimask`` off: the single-mask output).

        Raises:
            RunError: a newer schema, or a required entry missing.
        """
        version = int(data.get("schema_version", 0))
        if version > MANIFEST_SCHEMA:
            raise RunError(f"{where}: manifest schema {version} is newer than this samadapt's ({MANIFEST_SCHEMA})")
        missing = [key for key in ("base_model", "base_sha256", "peft") if key not in data]
        if missing:
            raise RunError(f"{where}: the manifest lacks {', '.join(missing)}")
        known = {f.name for f in fields(cls)} - {"extra", "schema_version"}
        values = {k: v for k, v in data.items() if k in known}
        values["classes"] = {int(k): str(v) for k, v in (data.get("classes") or {}).items()}
        extra = {k: v for k, v in data.items() if k not in known and k not in ("schema_version", "tensors")}
        if version < 2 and not values.get("outputs"):
            config = run_config or {}
            prompt = {**(values.get("prompt") or {})}
            prompt.setdefault("multimask", bool((config.get("prompt") or {}).get("multimask", False)))
            values["prompt"] = prompt
            iou_loss = float((config.get("loss") or {}).get("iou", 1.0))
            values["outputs"] = trained_outputs(values.get("task", "prompt"), prompt, values["peft"], iou_loss)
        return cls(**values, extra=extra)


@dataclass
class Run:
    """An adapted (or bare) model with what is needed to use it the way it was trained.

    Attributes:
        model: the model, in eval mode.
        task: ``prompt`` (binary mask per prompted object) or ``semantic`` (K + 1 class masks, no prompt).
        classes: dataset class id -> name, for the classes the model segments.
        name: the run directory's name, or the bare model's.
        manifest: the adapter's manifest (None for a bare model).
        one_click: how one click alone is answered (``selection.ONE_CLICK_RULES``): ``best`` (default) of SAM's
            three candidates, ``trained`` as the run trained, or ``single``.
    """

    model: Sam
    name: str
    task: str = "prompt"
    classes: dict[int, str] = field(default_factory=dict)
    manifest: Manifest | None = None
    path: Path | None = None
    one_click: str = DEFAULT_ONE_CLICK

    @property
    def select_single_click(self) -> bool:
        """Whether one click alone is answered by the best of SAM's three candidates (``selection.one_click_best``
        under ``one_click``)."""
        return one_click_best(self.manifest.to_dict() if self.manifest else None, self.one_click)

    @property
    def base_model(self) -> str:
        return self.manifest.base_model if self.manifest else self.name

    @property
    def precision(self) -> str:
        """The precision the run was trained in (``auto`` resolves per device); a bare model infers in
        ``precision.INFERENCE_PRECISION`` (fp32)."""
        return self.manifest.precision if self.manifest else INFERENCE_PRECISION

    @property
    def blend(self) -> float:
        """The weight the trained update is used at (``peft.blend``; 1.0: as trained, or a bare model)."""
        return current_blend(self.model)

    @property
    def axis(self) -> int | None:
        """The slicing axis the run was trained on (None: the dataset's)."""
        return self.manifest.axis if self.manifest else None

    @property
    def preprocessing(self) -> str:
        """The intensity preset the run was trained with ("" for a bare model: the dataset's or the caller's)."""
        return self.manifest.preprocessing if self.manifest else ""

    @property
    def label(self) -> str:
        """For progress bars and reports: the run directory with its base model (and its blend when it is not 1),
        or the bare model's name."""
        if not self.manifest:
            return self.name
        blend = f", blend {self.blend:g}" if self.blend != 1.0 else ""
        return f"{self.name} ({self.base_model}{blend})"


@lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime: float) -> str:
    return file_sha256(path)


def weights_sha256(path: str | Path) -> str:
    """SHA-256 of a weights file (cached per path, size and modification time)."""
    stat = Path(path).stat()
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime)


def base_model_facts(name: str, checkpoint: str | Path | None) -> dict:
    """Manifest entries that pin an adapter to its base model: name, weights path and checksum."""
    path = Path(checkpoint) if checkpoint else default_weights_path(name)
    return {"base_model": name, "base_checkpoint": str(path), "base_sha256": weights_sha256(path)}


def build_base(
    name: str,
    checkpoint: str | Path | None,
    img_size: int | None,
    num_classes: int | None,
    position_prior: bool = True,
    slice_position: bool = False,
) -> Sam:
    """The base model, with a semantic decoder of ``num_classes`` + 1 outputs when given (SAMed), its position
    map unless ``position_prior`` is False (runs saved before it existed), and with ``slice_position`` the slice
    position input (``model.slice_position``).

    Accelerated for the CPU (``accel.accelerate``): training, pre-training and loaded runs share it. The oneDNN
    kernels run only without autograd (the frozen leading stages, validation, inference); every op autograd sees is
    the reference modules' own."""
    if slice_position and not num_classes:
        raise ConfigError("model.slice_position needs a semantic decoder (task=semantic)")
    model = build_model(name, checkpoint=checkpoint, img_size=img_size)
    if num_classes:
        from samadapt.models.mask_decoder import make_semantic_decoder

        make_semantic_decoder(model.mask_decoder, num_classes, position_prior, slice_position)
    return accelerate(model, "cpu")


def load_run(
    path_or_model: str | Path,
    checkpoint: str = "best",
    device: str | torch.device | None = None,
    blend: float | None = None,
) -> Run:
    """Rebuild the model of a run directory (``checkpoint``: best or last), or a bare model by name, on ``device``
    (None / "auto": CUDA when available), computing with ``blend`` (``peft.blend``; None: the run's own).

    Raises:
        InputNotFoundError: not a run directory and not a model name. RunError: the adapter does not match its base.
    """
    text = str(path_or_model)
    if text in MODELS and not Path(text).exists():
        if blend not in (None, 1.0):
            raise ConfigError(f"{text} is a bare model: there is no trained update to blend")
        model = accelerate(build_model(text), "cpu")
        return Run(model=model.to(resolve_device(device)).eval(), name=text, task="prompt")
    run_dir = Path(path_or_model)
    adapter_dir = RunLayout(run_dir).checkpoint(checkpoint)
    if not adapter_dir.is_dir():
        adapter_dir = run_dir if (run_dir / "adapter_config.json").exists() else adapter_dir
    if not (adapter_dir / "adapter_config.json").exists():
        raise InputNotFoundError(
            f"{run_dir} is neither a run directory (no checkpoints/{checkpoint}/adapter_config.json) nor a model "
            f"name ({', '.join(MODELS)})"
        )
    manifest = Manifest.from_dict(
        read_manifest(adapter_dir), adapter_dir / "adapter_config.json", _run_config(RunLayout(run_dir).config)
    )
    if manifest.task == "pretrain":  # encoder PEFT tensors only: no decoder was adapted to any task
        raise RunError(
            f"{run_dir} is a pre-training run (samadapt pretrain); start a fine-tuning run from it with "
            f"samadapt train --init {run_dir}, then use that run"
        )
    checkpoint_path = _base_checkpoint(manifest)
    semantic = manifest.task == "semantic"
    priors = saved_decoder_priors(adapter_dir) if semantic else set()
    model = build_base(
        manifest.base_model,
        checkpoint_path,
        manifest.img_size,
        len(manifest.classes) if semantic else None,
        position_prior="position_prior" in priors,
        slice_position="slice_prior" in priors,
    )
    facts = base_model_facts(manifest.base_model, checkpoint_path)
    apply_peft(model, PeftConfig(**manifest.peft))
    load_adapter_weights(model, adapter_dir, facts["base_sha256"])
    set_blend(model, manifest.peft.get("blend", 1.0) if blend is None else blend)
    return Run(
        model.to(resolve_device(device)).eval(), run_dir.name, manifest.task, manifest.classes, manifest, run_dir
    )


def _run_config(path: Path) -> dict | None:
    """The run's config.yaml as a dict (to upgrade an old manifest), None when there is none or it is unreadable."""
    if not path.exists():
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _base_checkpoint(manifest: Manifest) -> str | None:
    path = manifest.base_checkpoint
    return path if path and Path(path).exists() else None  # moved machines: found by name, the checksum guards it


def load_base(run: Run, device: str | torch.device | None = None) -> Run:
    """The base model a run was adapted from, as a bare model: the checkpoint its manifest names, checksum verified.

    Raises:
        RunError: the weights found for the base model are not the ones the run was trained on.
    """
    if run.manifest is None:
        return run
    path = _base_checkpoint(run.manifest)
    facts = base_model_facts(run.manifest.base_model, path)
    if facts["base_sha256"] != run.manifest.base_sha256:
        raise RunError(
            f"{run.label}: trained on base weights {run.manifest.base_sha256[:12]}..., but {facts['base_checkpoint']} "
            f"has {facts['base_sha256'][:12]}...; give the original weights (--checkpoint)"
        )
    model = accelerate(build_model(run.manifest.base_model, checkpoint=path, img_size=run.manifest.img_size), "cpu")
    return Run(model.to(resolve_device(device)).eval(), run.manifest.base_model, "prompt")


@contextmanager
def baseline(run: Run, device: str | torch.device | None = None) -> Iterator[Run]:
    """The un-adapted model of ``run``, to score beside it with the same prompts.

    A prompted run yields its own model with the adapters off (``disable_adapters``: no second copy in memory); a
    semantic run, whose decoder was rebuilt with K + 1 outputs, yields its base checkpoint loaded apart. A bare model
    is its own baseline.
    """
    if run.manifest is None:
        yield run
    elif run.task == "prompt" and hasattr(run.model, "peft_base_values"):
        with disable_adapters(run.model):
            yield Run(run.model, run.manifest.base_model, "prompt", run.classes)
    else:
        yield load_base(run, device)


def load_pretrained_encoder(model: torch.nn.Module, run: str | Path, base_sha256: str) -> dict:
    """Copy a pre-training run's encoder PEFT tensors (its ``last`` checkpoint, or ``run`` itself when it is a
    checkpoint folder) into ``model``, built with its fine-tuning PEFT config (``samadapt train --init RUN``);
    returns the checkpoint's manifest.

    Raises:
        PretrainedInitError: not a pre-training run, other base weights, or other encoder PEFT slots
            (``peft.pretrained.load_encoder_peft``).
    """
    run = Path(run)
    for folder in (RunLayout(run).checkpoint("last"), run):
        if (folder / "adapter_config.json").is_file():
            return load_encoder_peft(model, folder, base_sha256)
    raise PretrainedInitError(f"{run}: not a pre-training run (no checkpoints/last/adapter_config.json)")


def algorithm_of(run) -> Algorithm:
    """The ``Algorithm`` (DICOM outputs' identification) of a loaded run (a predictor's ``run``: ``inference.load_predictor``): a run directory's
    adapter checksum, a bare model's weights checksum, an ONNX export's encoder checksum ("" where none is known)."""
    from samadapt.data.dicom_terms import Algorithm  # pydicom: only when DICOM is written

    name = str(getattr(run, "name", "") or "")
    export = getattr(run, "export", None)
    if isinstance(export, dict):
        encoder = export.get("files", {}).get("image_encoder", {})
        return Algorithm(run=Path(run.path).name, checksum=str(encoder.get("sha256", "")), checksum_of="onnx encoder")
    path = getattr(run, "path", None)
    if path is not None:
        for candidate in (RunLayout(Path(path)).checkpoint("best") / ADAPTER_WEIGHTS, Path(path) / ADAPTER_WEIGHTS):
            if candidate.is_file():
                return Algorithm(run=name, checksum=weights_sha256(candidate))
    if getattr(run, "manifest", None) is None and name in MODELS:
        try:
            return Algorithm(run=name, checksum=weights_sha256(default_weights_path(name)), checksum_of="model")
        except FileNotFoundError:
            pass
    return Algorithm(run=name)
