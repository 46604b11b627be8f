"""Self-supervised pre-training of the image encoder's PEFT parameters on unlabelled slices (MSA: MAE, e-Mix, ShED)."""

from samadapt.peft.pretrained import PretrainedInitError, encoder_only
from samadapt.pretrain.api import build_pretrainer, pretrain
from samadapt.pretrain.config import PretrainConfig
from samadapt.runs import load_pretrained_encoder

__all__ = [
    "PretrainConfig",
    "PretrainedInitError",
    "build_pretrainer",
    "encoder_only",
    "load_pretrained_encoder",
    "pretrain",
]
