"""Training from a dataset directory or from ready slices: the library entry points behind ``samadapt train``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from torch import nn

from samadapt.errors import TrainingError
from samadapt.peft import apply_peft, format_parameter_report
from samadapt.runs import Manifest, base_model_facts, build_base, trained_outputs
from samadapt.train.config import TrainConfig
from samadapt.train.samples import ItemChain, TrainingSlices
from samadapt.train.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)


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
    from samadapt.pretrain.init import load_pretrained_encoder

    sha = base_model_facts(config.model.name, config.model.checkpoint)["base_sha256"]
    pretrained = load_pretrained_encoder(model, config.model.init, sha)
    return model, {"init": {"run": str(config.model.init), **pretrained.get("pretrain", {})}}


def train(config: TrainConfig, run_dir: str | Path, resume: bool = False) -> TrainResult:
    """Train on ``config.data.path``: split cases, select exemplars if asked, add synthetic slices, fit."""
    from samadapt.data.datasets import SliceDataset, load_dataset, split_cases

    spec = load_dataset(config.data.path)
    classes = _chosen_classes(spec.classes, config.data.classes, spec.root)
    slices = SliceDataset(spec, axis=config.data.axis)
    train_cases, val_cases = split_cases(spec, config.data.val_cases, config.train.seed)
    labelled = slices.indices(list(classes), train_cases)
    if not labelled:
        raise TrainingError(f"{spec.root}: no training slice holds any of the classes {sorted(classes)}")
    if config.data.exemplars:
        from samadapt.data.synthesis import select_exemplars

        # chosen among the training cases only: --exemplars N trains on exactly N labelled slices
        chosen = select_exemplars(
            slices, config.data.exemplars, list(classes), seed=config.train.seed, cases=train_cases
        )
        log.info("exemplars: %s", [slices.slices[i][:2] for i in chosen])
    else:
        chosen = labelled
    # a few target-free slices teach the prompted model that a click on background means "nothing here"
    with_target = set(labelled)
    empty = [i for i in slices.indices(None, train_cases) if i not in with_target]
    rng = np.random.default_rng(config.train.seed)
    extra = list(rng.choice(empty, size=min(len(empty), max(1, len(chosen) // 4)), replace=False)) if empty else []
    empties = slices.subset([int(i) for i in extra] if config.task == "prompt" else [])
    synthetic = _synthetic_items(config, slices, chosen, classes, train_cases)
    train_items = ItemChain(slices.subset(chosen), empties)
    val_pool = slices.indices(list(classes), val_cases) if val_cases else []
    val_pick = np.linspace(0, len(val_pool) - 1, num=min(len(val_pool), config.train.val_slices)).astype(int)
    val_items = [slices[val_pool[i]] for i in sorted(set(val_pick))] if val_pool else []
    config.data.path = str(spec.root)
    return fit_slices(
        config,
        train_items,
        val_items,
        classes,
        run_dir,
        spec.preprocessing,
        resume,
        synthetic_items=synthetic,
        modality=spec.modality,
    )


def _chosen_classes(available: dict[int, str], wanted: list[int] | None, root: Path) -> dict[int, str]:
    if wanted is None:
        return dict(available)
    missing = [c for c in wanted if c not in available]
    if missing:
        raise TrainingError(f"{root}: classes {missing} are not in dataset.json (has {sorted(available)})")
    return {c: available[c] for c in wanted}


def _synthetic_items(
    config: TrainConfig, slices, exemplar_indices: list[int], classes: dict[int, str], train_cases: list[str]
) -> Sequence[dict]:
    """Slices of a synthesised set (a directory from ``samadapt synth``, or made now from the exemplars, on
    backgrounds from the training cases only: a validation case never leaks into training)."""
    if config.data.synthetic:
        from samadapt.data.datasets import SliceDataset, load_dataset

        synthetic = SliceDataset(load_dataset(config.data.synthetic))
        return synthetic.subset(range(len(synthetic)))
    if not config.data.synthesize_on_the_fly:
        return []
    from samadapt.data.synthesis import SynthesisConfig, background_slices, synthesize

    picked = background_slices(slices, list(classes), cases=train_cases, seed=config.train.seed)
    backgrounds = [slices[i]["image"] for i in picked]
    if not backgrounds:
        raise TrainingError("synthesis needs target-free background slices, and the dataset has none")
    exemplars = [slices[i] for i in exemplar_indices]
    return synthesize(exemplars, backgrounds, config.data.synthetic_size, SynthesisConfig(), seed=config.train.seed)
