"""Shared fixtures: tiny MERT configurations that run in milliseconds on a CPU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from culturemert.models.config import MertConfig

REPO = Path(__file__).resolve().parents[1]
TINY_CONV = "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2"


def tiny_config(**overrides) -> MertConfig:
    """A 2-layer, 64-wide MERT with the real conv strides (75 frames/s) and small heads."""
    fields = dict(
        conv_feature_layers=TINY_CONV,
        encoder_layers=2,
        encoder_embed_dim=64,
        encoder_ffn_embed_dim=128,
        encoder_attention_heads=4,
        conv_pos=16,
        conv_pos_groups=4,
        final_dim=16,
        cqt_bins=336,
    )
    fields.update(overrides)
    return MertConfig(**fields)


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors on a shared CPU: a second thread only adds synchronisation cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
