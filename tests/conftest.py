"""Shared fixtures: small SAM models with random weights (fast on CPU), the real demo data."""

import os

import pytest
import torch


def make_tiny_sam(img_size: int = 128, seed: int = 0):
    """A 4-block ViT SAM (2 windowed + 2 global blocks) with the real prompt encoder / decoder layout."""
    from samadapt.models.registry import assemble_sam
    from samadapt.models.vit import ImageEncoderViT

    torch.manual_seed(seed)
    encoder = ImageEncoderViT(img_size=img_size, embed_dim=64, depth=4, num_heads=4, global_attn_indexes=(1, 3))
    return assemble_sam(encoder, img_size, sam_normalisation=True).eval()


@pytest.fixture
def tiny_sam():
    return make_tiny_sam()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The real demo datasets (DESIGN.md §4), fetched once per session ($SAMADAPT_CACHE reuses a cache)."""
    from samadapt.data.demo import fetch_demo

    cache = os.environ.get("SAMADAPT_CACHE") or str(tmp_path_factory.mktemp("cache"))
    return fetch_demo(cache)
