"""A run directory is self-describing: ``load_run`` rebuilds the adapted model from it alone.

Layout written by ``samadapt train``::

    RUN_DIR/config.yaml                      the full TrainConfig
    RUN_DIR/checkpoints/{best,last}/         adapter_model.safetensors + adapter_config.json (+ trainer_state.pt)
    RUN_DIR/metrics.csv, loss_curve.png      training log

``load_run`` also accepts a bare model name (e.g. ``lite_medsam``): the un-adapted baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from samadapt.device import resolve_device
from samadapt.models.checkpoint import file_sha256
from samadapt.models.registry import MODELS, build_model, default_weights_path
from samadapt.models.sam import Sam
from samadapt.peft import PeftConfig, apply_peft, load_adapter_weights, read_manifest


@dataclass
class Run:
    """An adapted (or bare) model with what is needed to use it the way it was trained.

    Attributes:
        model: the model, in eval mode.
        task: ``prompt`` (binary mask per prompted object) or ``semantic`` (K + 1 class masks, no prompt).
        classes: dataset class id -> name, for the classes the model segments.
        manifest: the adapter manifest (empty for a bare model).
    """

    model: Sam
    name: str
    task: str = "prompt"
    classes: dict[int, str] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def precision(self) -> str:
        """The precision the run was trained in (``auto`` resolves per device); a bare model computes in fp32."""
        return self.manifest.get("precision", "fp32")

    @property
    def label(self) -> str:
        """For progress bars: the run directory with its base model, or the bare model's name."""
        return f"{self.path.name} ({self.name})" if self.path else self.name


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


def build_base(name: str, checkpoint: str | Path | None, img_size: int | None, num_classes: int | None) -> Sam:
    """The base model, with a semantic decoder of ``num_classes`` + 1 outputs when given (SAMed)."""
    model = build_model(name, checkpoint=checkpoint, img_size=img_size)
    if num_classes:
        from samadapt.models.mask_decoder import make_semantic_decoder

        make_semantic_decoder(model.mask_decoder, num_classes)
    return model


def load_run(path_or_model: str | Path, checkpoint: str = "best", device: str | torch.device | None = None) -> Run:
    """Rebuild the model of a run directory (``checkpoint``: best or last), or a bare model by name, on ``device``
    (None / "auto": CUDA when available).

    Raises:
        FileNotFoundError: not a run directory and not a model name. ValueError: the adapter does not match its base.
    """
    text = str(path_or_model)
    if text in MODELS and not Path(text).exists():
        model = build_model(text)
        return Run(model=model.to(resolve_device(device)).eval(), name=text, task="prompt")
    run_dir = Path(path_or_model)
    adapter_dir = run_dir / "checkpoints" / checkpoint
    if not adapter_dir.is_dir():
        adapter_dir = run_dir if (run_dir / "adapter_config.json").exists() else adapter_dir
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"{run_dir} is neither a run directory (no checkpoints/{checkpoint}/adapter_config.json) nor a model "
            f"name ({', '.join(MODELS)})"
        )
    manifest = read_manifest(adapter_dir)
    classes = {int(k): v for k, v in manifest.get("classes", {}).items()}
    task = manifest.get("task", "prompt")
    checkpoint_path = manifest.get("base_checkpoint")
    if checkpoint_path and not Path(checkpoint_path).exists():
        checkpoint_path = None  # moved machines: find the base weights by name, the checksum still guards them
    model = build_base(
        manifest["base_model"], checkpoint_path, manifest.get("img_size"), len(classes) if task == "semantic" else None
    )
    facts = base_model_facts(manifest["base_model"], checkpoint_path)
    apply_peft(model, PeftConfig(**manifest["peft"]))
    load_adapter_weights(model, adapter_dir, facts["base_sha256"])
    return Run(model.to(resolve_device(device)).eval(), manifest["base_model"], task, classes, manifest, run_dir)
