"""Options shared by several commands, worded once."""

from __future__ import annotations

import argparse

DEVICE_HELP = "auto (default: CUDA when available), cpu, cuda or cuda:N"

BACKEND_HELP = (
    "torch (default) or onnxruntime (fp32, CPU): --run is then an export directory (samadapt export), or a run / "
    "model exported on the fly into a temporary folder"
)

BLEND_HELP = (
    "weight of the trained update, 0-1 (peft.blend, WiSE-FT: 1 the trained run, 0 its base model, 0.5 halfway in "
    "weight space); default: the run's own"
)

PRECISION_HELP = (
    "torch backend: auto (bf16 where the device has native bf16 kernels, else fp32), fp32, bf16 or fp16 (CUDA); "
    "default: the run's training precision, fp32 for a bare model"
)

KEEP_COMPONENTS_HELP = (
    "all (default): the masks as predicted; prompt: of each prompted mask, only the connected components a positive "
    "click falls on or the box overlaps (none touched: the one nearest to the clicks, else to the box)"
)

ONE_CLICK_HELP = (
    "how one click alone is answered: best (default) of SAM's three candidates by its IoU head; trained: the best of "
    "three only where the run trained them (prompt.multimask), else its single-mask output; single: always the "
    "single-mask output"
)

PROPAGATION_HELP = (
    "how a volume box (and the interactive protocol's clicks) carry to the next slice: box (default): the box of the "
    "neighbour's mask; memory: also the neighbour's low-resolution logits as SAM's mask prompt"
)

LARGEST_COMPONENT_HELP = (
    "class ids (e.g. 1,3) reduced to their largest 3D connected component, or 'all' (default: none); which classes "
    "gain is decided from labelled slices: samadapt.eval.postprocess.decide_largest_component"
)


def largest_component_classes(text: str | None) -> list[int] | str | None:
    """``--largest-component``: ``"all"``, or comma-separated class ids as a list; None when unset."""
    from samadapt.errors import ConfigError

    if not text or text == "all":
        return text or None
    try:
        return sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ConfigError(f"--largest-component {text!r}: give class ids such as 1,3, or all") from None


def add_predictor_options(parser: argparse.ArgumentParser) -> None:
    """The options that choose how a run predicts (``predictor_from``), for ``evaluate`` and ``predict``."""
    from samadapt.components import KEEP_COMPONENTS
    from samadapt.precision import PRECISIONS
    from samadapt.selection import DEFAULT_ONE_CLICK, ONE_CLICK_RULES

    parser.add_argument("--device", help=DEVICE_HELP)
    parser.add_argument("--precision", choices=PRECISIONS, help=PRECISION_HELP)
    parser.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch", help=BACKEND_HELP)
    parser.add_argument("--blend", type=float, help=BLEND_HELP)
    parser.add_argument("--keep-components", choices=KEEP_COMPONENTS, default="all", help=KEEP_COMPONENTS_HELP)
    parser.add_argument("--largest-component", help=LARGEST_COMPONENT_HELP)
    parser.add_argument("--one-click", choices=ONE_CLICK_RULES, default=DEFAULT_ONE_CLICK, help=ONE_CLICK_HELP)
    parser.add_argument("--propagation", choices=("box", "memory"), default="box", help=PROPAGATION_HELP)


def predictor_from(args: argparse.Namespace, cache_size: int = 0):
    """The predictor ``args.run`` names, on ``args.backend``: the one place the CLI reads ``--backend``."""
    from samadapt.inference import load_predictor

    return load_predictor(
        args.run,
        args.backend,
        device=args.device,
        precision=args.precision,
        cache_size=cache_size,
        blend=args.blend,
        keep_components=args.keep_components,
        one_click=args.one_click,
    )
