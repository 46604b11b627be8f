"""Training from a dataset directory or from ready slices: the library entry points behind ``samadapt train``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from torch import nn

from samadapt.errors import TrainingError
from samadapt.peft import apply_peft, format_parameter_report
from samadapt.runs import Manifest, base_model_facts, build_base, load_pretrained_encoder, trained_outputs
from samadapt.train.config import TrainConfig
from samadapt.train.samples import ItemChain, TrainingSlices
from samadapt.train.trainer import Trainer, TrainResult


def fit_slices(
    config: TrainConfig,
    train_items: Sequence[dict],
    val_items: Sequence[dict],
    classes: dict[int, str],
    run_dir: str | Path,
    preprocessing: str = "",
    resume: bool = False,
    verbose: bool = True,
    synthetic_items: Sequence[dict] = (),
    modality: str | None = None,
) -> TrainResult:
    """Adapt the configured model on preprocessed slices (``SliceDataset`` items: ``image`` (H, W[, 3]) in [0, 1],
    ``label`` (H, W); validation items also ``case``, ``slice`` and ``spacing``).

    ``train_items`` may be lazy (``SliceDataset.subset`` views, chained with ``ItemChain``): slices are then read
    per batch by DataLoader workers, and memory does not grow with the size of the training set.

    ``classes`` maps the dataset's class ids to names; they are the classes learned (semantic outputs in that order).
    ``synthetic_items`` (e.g. ``synthesize`` output) train too, drawn with probability ``data.synthetic_share``.
    ``modality`` (dataset.json's; default: from the preset) words the generated text-prompt phrases.
    """
    if not train_items:
        raise TrainingError("no training slices")
    model, init = adapted_model(config, classes)
    if verbose:
        print(format_parameter_report(model))
    multimask = config.prompt.multimask and config.task == "prompt"
    prompt = {"kind": config.prompt.kind, "objects": config.prompt.objects, "multimask": multimask}
    manifest = Manifest(
        **base_model_facts(config.model.name, config.model.checkpoint),
        peft=config.peft.to_dict(),
        recipe=config.recipe,
        task=config.task,
        img_size=model.img_size,
        classes=dict(classes),
        preprocessing=preprocessing,
        axis=config.data.axis,
        prompt=prompt,
        # which outputs trained: how one click is answered at inference (``selection.one_click_best``)
        outputs=trained_outputs(config.task, prompt, config.peft.to_dict(), config.loss.iou),
        precision=config.train.precision,
        extra=init,
    )
    if config.prompt.uses_text:
        from samadapt.text.phrases import build_phrase_book, modality_from_preset

        book = build_phrase_book(classes, modality or modality_from_preset(preprocessing), config.prompt.phrases)
        manifest.text = {**asdict(config.peft.text), **book.to_dict()}
    if len(synthetic_items):  # lists stay a list: in-memory slices need no loader worker processes
        lazy = hasattr(train_items, "info") or hasattr(synthetic_items, "info")
        train_items = ItemChain(train_items, synthetic_items) if lazy else [*train_items, *synthetic_items]
    train_slices = TrainingSlices(train_items, model.img_size)
    trainer = Trainer(
        config, model, train_slices, val_items, list(classes), run_dir, manifest, synthetic=len(synthetic_items)
    )
    return trainer.fit(resume=resume)


def adapted_model(config: TrainConfig, classes: dict[int, str]) -> tuple[nn.Module, dict]:
    """The base model with ``config.peft`` applied (frozen but for what trains) and, with ``config.model.init``,
    the encoder PEFT parameters of that pre-training run; returns it and the manifest entry naming the init run.

    Raises:
        PretrainedInitError: the init run has another base model or other encoder slots.
    """
    semantic = config.task == "semantic"
    model = build_base(
        config.model.name,
        config.model.checkpoint,
        config.model.img_size,
        len(classes) if semantic else None,
        slice_position=config.model.slice_position,
    )
    apply_peft(model, config.peft)
    if not config.model.init:
        return model, {}
    sha = base_model_facts(config.model.name, config.model.checkpoint)["base_sha256"]
    pretrained = load_pretrained_encoder(model, config.model.init, sha)
    return model, {"init": {"run": str(config.model.init), **pretrained.get("pretrain", {})}}


def train(config: TrainConfig, run_dir: str | Path, resume: bool = False) -> TrainResult:
    """Train on ``config.data.path``: split cases, select exemplars if asked, add synthetic slices, fit
    (``data.selection``)."""
    from samadapt.data.datasets import load_dataset
    from samadapt.data.selection import chosen_classes, select_training, synthetic_items

    spec = load_dataset(config.data.path)
    classes = chosen_classes(spec.classes, config.data.classes, spec.root)
    selection = select_training(
        spec,
        list(classes),
        axis=config.data.axis,
        val_cases=config.data.val_cases,
        seed=config.train.seed,
        exemplars=config.data.exemplars,
        empty_slices=config.task == "prompt",
        val_slices=config.train.val_slices,
    )
    synthetic = synthetic_items(
        selection,
        list(classes),
        directory=config.data.synthetic,
        on_the_fly=config.data.synthesize_on_the_fly,
        size=config.data.synthetic_size,
        seed=config.train.seed,
    )
    slices = selection.slices
    train_items = ItemChain(slices.subset(selection.labelled), slices.subset(selection.empty))
    config.data.path = str(spec.root)
    return fit_slices(
        config,
        train_items,
        selection.val_items(),
        classes,
        run_dir,
        spec.preprocessing,
        resume,
        synthetic_items=synthetic,
        modality=spec.modality,
    )
