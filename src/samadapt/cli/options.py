"""Options shared by several commands, worded once."""

from __future__ import annotations

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
