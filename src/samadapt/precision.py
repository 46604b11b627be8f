"""Which reduced precision pays on a device.

bfloat16 autocast is a large win where the hardware computes in bfloat16 (CUDA GPUs from Ampere on, CPUs with
AVX-512 / AMX, where oneDNN has bfloat16 kernels) and a disaster where it does not: on an AVX2-only CPU a bfloat16
matrix product falls back to scalar code, hundreds of times slower than float32. ``auto`` picks for the machine.
"""

from __future__ import annotations

import torch

from samadapt.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# Inference precision where nothing else decides (a bare base model's ``Run.precision``, ``Predictor``'s default).
# fp32: bf16 inference (``--precision auto`` / ``Predictor(precision="auto")``) is 2x faster on native-bf16 CPUs but
# moves masks too far for a default (bench/precision_accuracy.py on the demo data, docs/performance.md issue 14:
# bf16 vs fp32 mask Dice 0.990 on lesions, 0.963 / 0.951 on MNI152 grey / white matter; goal >= 0.99). An
# adapted run infers in its training precision (``Run.precision``).
INFERENCE_PRECISION = "fp32"


def fast_bfloat16(device: str | torch.device = "cpu") -> bool:
    """True when ``device`` has native bfloat16 kernels (oneDNN on the CPU, compute capability >= 8.0 on CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``auto`` -> ``bf16`` where it is fast on ``device``, else ``fp32``; any other choice is returned as given."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if fast_bfloat16(device) else "fp32"
