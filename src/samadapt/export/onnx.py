"""Export a run (or a bare model) as ONNX graphs plus a manifest: ``samadapt export --format onnx``.

An export directory holds::

    DIR/image_encoder.onnx   images (B, 3, S, S) in [0, 1] -> embeddings (B, 256, S/16, S/16); the checkpoint's pixel
                             normalisation is inside the graph, PEFT is part of it (LoRA merged into the weights,
                             MSA adapters as nodes)
    DIR/decoder.onnx         prompted runs: prompt encoder + mask decoder (below); semantic runs: the prompt-free
                             K + 1 class head, embeddings (B, 256, h, w) -> masks (B, K + 1, 4h, 4w), iou (B, K + 1);
                             a run trained with ``model.slice_position`` also takes ``slice_position`` (B,) in [0, 1]
    DIR/manifest.json        what the graphs need and came from (``runtime.MANIFEST`` keys, see ``export_onnx``)

The prompted decoder takes prompts the way SAM's own ONNX export does, so any number of points and boxes goes
through one graph with a dynamic prompt-set count P and a dynamic token count N:

    image_embeddings (1, 256, h, w)   one image, shared by the P prompt sets
    point_coords (P, N, 2) float32    (x, y) pixels of the model input; a box is two points (top-left, bottom-right)
    point_labels (P, N) float32       1 foreground, 0 background, 2 box top-left, 3 box bottom-right, -1 padding
    mask_input (P or 1, 1, 4h, 4w)    low-res logits of a previous prediction (zeros when unused)
    has_mask_input (1,) float32       1: use mask_input, 0: the learned "no mask" embedding

and returns every mask token's low-res logits ``masks (P, T, 4h, 4w)`` and ``iou_predictions (P, T)`` (T = 4 for
SAM); the runtime picks token 0 (single mask) or tokens 1.. (multimask), as ``MaskDecoder`` does. Points given
without a box end with one padding point (label -1), exactly as ``PromptEncoder`` appends it.

The graphs hold standard ONNX ops only (``opset``, default 17; onnxruntime's own optimiser adds its fused ops when a
session loads them). The copy exported is in the graph forms of ``accel.onnx_forms``: the same function, faster on
onnxruntime's CPU provider (a TinyViT encoder's stage 0 in strips of rows and its window attention with one
transpose each way; bench/onnx_encoder.py times them) or traceable without slice assignments.

Not exported: MSA's 3D depth branch (it attends across the slices of a volume; the exported encoder sees each slice
on its own, where the branch adds exactly nothing). A run that has one is refused unless ``drop_depth=True``, and
the manifest then says so.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from samadapt import __version__
from samadapt.accel import accelerate
from samadapt.errors import ConfigError, UnsupportedExportError
from samadapt.export.runtime import DECODER, ENCODER, FORMAT, FORMAT_VERSION, MANIFEST, SLICE_POSITION
from samadapt.files import atomic_write_text
from samadapt.models.checkpoint import file_sha256
from samadapt.models.common import ZeroSlot, is_empty_slot
from samadapt.models.sam import Sam, takes_slice_position
from samadapt.peft.depth import DepthBranch
from samadapt.peft.lora import LoRALinear

__all__ = ["DEFAULT_OPSET", "UnsupportedExportError", "export_onnx", "export_model"]

DEFAULT_OPSET = 17


class _Encoder(nn.Module):
    def __init__(self, model: Sam) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class _PromptedDecoder(nn.Module):
    """Prompt encoder + mask decoder over SAM-style point prompts (see the module docstring)."""

    def __init__(self, model: Sam) -> None:
        super().__init__()
        self.model = model

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(P, N, 2) pixels and (P, N) labels -> (P, N, C): ``PromptEncoder._embed_points`` / ``_embed_boxes``."""
        encoder = self.model.prompt_encoder
        embedding = encoder.pe_layer.forward_with_coords(coords + 0.5, encoder.input_image_size)
        labels = labels.unsqueeze(-1)
        embedding = torch.where(labels == -1, encoder.not_a_point_embed.weight, embedding)
        for kind, table in enumerate(encoder.point_embeddings):  # 0 negative, 1 positive, 2 / 3 box corners
            embedding = embedding + torch.where(labels == kind, table.weight, 0.0)
        return embedding

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.model.prompt_encoder
        prompts = point_coords.shape[0]
        sparse = self._embed_points(point_coords, point_labels)
        no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = has_mask_input * encoder.mask_downscaling(mask_input) + (1.0 - has_mask_input) * no_mask
        dense = dense.expand(prompts, -1, -1, -1)
        images = image_embeddings.expand(prompts, -1, -1, -1)
        return self.model.mask_decoder.predict_masks(images, encoder.get_dense_pe(), sparse, dense)


class _SemanticDecoder(nn.Module):
    """The prompt-free K + 1 class head of a semantic run (``Sam.decode(embeddings)``)."""

    def __init__(self, model: Sam) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, image_embeddings: torch.Tensor, slice_position: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.model.prompt_encoder
        # (B, 0, C): no prompt token, with the batch taken from the input so that it stays dynamic
        sparse = image_embeddings.flatten(2)[:, :, :0].transpose(1, 2)
        dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand_as(image_embeddings)
        return self.model.mask_decoder.predict_masks(
            image_embeddings, encoder.get_dense_pe(), sparse, dense, slice_position
        )


def deployable_copy(model: Sam, drop_depth: bool = False) -> tuple[Sam, dict]:
    """A CPU fp32 eval copy of ``model`` as it is exported: LoRA merged, depth branches removed (if allowed), the
    modules in the graph forms an export traces (``accel.accelerate(..., "onnx")``).

    Returns the copy and notes for the manifest. Raises ``UnsupportedExportError`` for a depth branch without
    ``drop_depth``.
    """
    # the graph is traced from a CPU fp32 copy whatever device the run is on: an ONNX file is device-independent,
    # and onnxruntime picks its execution provider at load time
    copied = copy.deepcopy(model).to("cpu", torch.float32).eval()
    notes: dict = {}
    blocks = [m for m in copied.modules() if isinstance(getattr(m, "depth_branch", None), DepthBranch)]
    if blocks:
        if not drop_depth:
            raise UnsupportedExportError(
                f"this run has MSA's 3D depth branch ({len(blocks)} encoder blocks): it attends across the slices "
                "of a volume and is not exported. The exported encoder sees one slice at a time, where the branch "
                "adds exactly nothing (samadapt's Predictor encodes slices one by one too); export without it with "
                "--drop-depth (API: drop_depth=True)"
            )
        for block in blocks:
            block.depth_branch = ZeroSlot()
        notes["depth_branch"] = (
            f"excluded ({len(blocks)} blocks): the graphs encode each slice on its own, where the branch adds nothing"
        )
    lora = [m for m in copied.modules() if isinstance(m, LoRALinear)]
    for module in lora:
        module.merge()
    notes["lora_merged"] = len(lora)
    notes["msa_adapters"] = sum(
        1 for name, module in copied.named_modules() if name.endswith("_adapter") and not is_empty_slot(module)
    )
    for param in copied.parameters():
        param.requires_grad_(False)
    return accelerate(copied, "onnx"), notes


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], dynamic, opset: int):
    module.eval()
    with warnings.catch_warnings():
        # tracer notes on Python-level shape checks (fixed input size, constant geometry) and the exporter's notice
        # that the TorchScript path is the older one: neither changes the graph
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=dynamic,
                opset_version=opset,
                do_constant_folding=True,
            )


def export_model(
    model: Sam,
    out: str | Path,
    task: str = "prompt",
    classes: dict[int, str] | None = None,
    name: str = "model",
    run_manifest: dict | None = None,
    drop_depth: bool = False,
    opset: int = DEFAULT_OPSET,
) -> dict:
    """Export a ``Sam`` (any PEFT applied) into ``out``; returns the manifest written as ``out/manifest.json``.

    Args:
        model: the model (left untouched: a merged, CPU fp32 copy is exported).
        task: ``prompt`` (the prompted decoder) or ``semantic`` (the prompt-free K + 1 head).
        classes: dataset class id -> name.
        name: base model name (registry name, e.g. ``lite_medsam``).
        run_manifest: the run's adapter manifest (base checksum, PEFT, preprocessing preset, slicing axis), kept.
        drop_depth: export a run with MSA's depth branch without it (see the module docstring).
        opset: ONNX opset.

    Raises:
        UnsupportedExportError: a depth branch without ``drop_depth``, or a task that is neither prompt nor semantic.
    """
    if task not in ("prompt", "semantic"):
        raise UnsupportedExportError(f"unknown task {task!r}: prompt or semantic")
    semantic_decoder = bool(getattr(model.mask_decoder, "semantic", False))
    if (task == "semantic") != semantic_decoder:
        raise UnsupportedExportError(
            f"task {task!r} but the mask decoder is {'semantic' if semantic_decoder else 'prompted'}"
        )
    deployable, notes = deployable_copy(model, drop_depth)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = deployable.img_size
    prompt_encoder = deployable.prompt_encoder
    h, w = prompt_encoder.image_embedding_size
    channels = prompt_encoder.embed_dim
    _export(
        _Encoder(deployable),
        (torch.rand(1, 3, size, size),),
        out / ENCODER,
        ["images"],
        ["image_embeddings"],
        {"images": {0: "batch"}, "image_embeddings": {0: "batch"}},
        opset,
    )
    embeddings = torch.randn(1, channels, h, w)
    if task == "semantic":
        inputs = (embeddings.expand(2, -1, -1, -1).contiguous(),)
        names, dynamic = ["image_embeddings"], {"image_embeddings": {0: "batch"}}
        if takes_slice_position(deployable):  # model.slice_position: each slice's position is a graph input too
            inputs, names = (*inputs, torch.tensor([0.25, 0.75])), [*names, SLICE_POSITION]
            dynamic[SLICE_POSITION] = {0: "batch"}
        _export(
            _SemanticDecoder(deployable),
            inputs,
            out / DECODER,
            names,
            ["masks", "iou_predictions"],
            {**dynamic, "masks": {0: "batch"}, "iou_predictions": {0: "batch"}},
            opset,
        )
    else:
        mask_size = prompt_encoder.mask_input_size
        _export(
            _PromptedDecoder(deployable),
            (
                embeddings,
                torch.rand(2, 3, 2) * size,
                torch.tensor([[1.0, 0.0, -1.0], [2.0, 3.0, 1.0]]),
                torch.randn(1, 1, *mask_size),
                torch.ones(1),
            ),
            out / DECODER,
            ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"],
            ["masks", "iou_predictions"],
            {
                "point_coords": {0: "prompts", 1: "points"},
                "point_labels": {0: "prompts", 1: "points"},
                "mask_input": {0: "mask_batch"},
                "masks": {0: "prompts"},
                "iou_predictions": {0: "prompts"},
            },
            opset,
        )
    run_manifest = dict(run_manifest or {})
    base = {key: run_manifest.get(key) for key in ("base_model", "base_sha256")}
    if base["base_sha256"] is None:
        base = _bare_model_facts(name)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "samadapt_version": __version__,
        "opset": opset,
        "exporter": f"torch {torch.__version__} (TorchScript ONNX exporter)",
        "task": task,
        "classes": {str(k): v for k, v in (classes or {}).items()},
        "img_size": size,
        "embedding_size": [h, w],
        "embed_dim": channels,
        "mask_input_size": list(prompt_encoder.mask_input_size),
        "num_mask_tokens": deployable.mask_decoder.num_mask_tokens,
        "slice_position": takes_slice_position(deployable),  # decoder.onnx takes each slice's position (data.position)
        "preprocessing": {
            "model_input": "slice in [0, 1] (preset applied, or raw: uint8 / 255, else min-max), grey repeated to 3 "
            "channels, longest side resized to img_size (bilinear, antialiased), zero-padded bottom / right, "
            "clamped to [0, 1]; pixel normalisation is inside image_encoder.onnx",
            "pixel_mean": [float(v) for v in deployable.pixel_mean.flatten()],
            "pixel_std": [float(v) for v in deployable.pixel_std.flatten()],
            "input_scale": float(deployable.input_scale),
            "preset": run_manifest.get("preprocessing"),
            "axis": run_manifest.get("axis"),
        },
        **base,
        "peft": run_manifest.get("peft"),
        "notes": notes,
        "files": {
            "image_encoder": {"path": ENCODER, "sha256": file_sha256(out / ENCODER)},
            "decoder": {"path": DECODER, "sha256": file_sha256(out / DECODER)},
        },
        "run_manifest": run_manifest,
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def _bare_model_facts(name: str) -> dict:
    """Base name and weights checksum of a registry model (None for a model built in memory)."""
    from samadapt.models.registry import MODELS
    from samadapt.runs import base_model_facts

    if name not in MODELS:
        return {"base_model": name, "base_sha256": None}
    try:
        facts = base_model_facts(name, None)
    except (FileNotFoundError, OSError):
        return {"base_model": name, "base_sha256": None}
    return {"base_model": name, "base_sha256": facts["base_sha256"]}


def export_onnx(
    run,
    out: str | Path,
    drop_depth: bool = False,
    opset: int = DEFAULT_OPSET,
    device: str | None = None,
    blend: float | None = None,
) -> dict:
    """Export a ``Run`` (or a run directory / model name, loaded with ``load_run`` on ``device`` at ``blend``) into
    ``out``; returns the manifest.

    See ``export_model`` for what is written and what is refused.
    """
    from samadapt.runs import Run, load_run

    if not isinstance(run, Run):
        run = load_run(run, device=device, blend=blend)
    elif blend is not None:
        raise ConfigError("blend applies to a run loaded here; for a loaded Run use load_run(..., blend=)")
    run_manifest = run.manifest.to_dict() if run.manifest else {}
    if run_manifest:  # the blend the graphs were traced at, which may differ from the run's own (load_run(blend=))
        run_manifest["peft"] = {**run_manifest["peft"], "blend": run.blend}
    return export_model(
        run.model,
        out,
        task=run.task,
        classes=run.classes,
        name=run.base_model,
        run_manifest=run_manifest,
        drop_depth=drop_depth,
        opset=opset,
    )
