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
