"""The SAM family: ViT and TinyViT image encoders, prompt encoder, mask decoder, builders and checkpoint loading."""

from samadapt.errors import CheckpointError
from samadapt.models.checkpoint import load_checkpoint, load_state_dict_strict, read_state_dict
from samadapt.models.sam import Sam


def __getattr__(name: str):
    # the registry imports every architecture: load it only when a builder is asked for
    if name in ("MODELS", "build_model", "default_weights_path", "list_models"):
        from samadapt.models import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'samadapt.models' has no attribute {name!r}")


__all__ = [
    "MODELS",
    "CheckpointError",
    "Sam",
    "build_model",
    "default_weights_path",
    "list_models",
    "load_checkpoint",
    "load_state_dict_strict",
    "read_state_dict",
]
