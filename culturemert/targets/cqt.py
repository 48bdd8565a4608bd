"""The musical teacher: constant-Q transform magnitudes of the clean audio (thesis eq. 3.3).

nnAudio's CQT with the MERT release's settings runs as convolutions on the training device.
Alignment: with ``center=True`` CQT frame t is centred on sample 320 t, so a crop of n samples
gives ``n // 320 + 1`` frames (376 for 5 s) while the model gives 374; like fairseq's HuBERT
(``forward_targets``) the first frames are kept and the trailing extra ones dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from nnAudio.features import CQT
from torch import nn

from culturemert.audio import HOP_LENGTH, SAMPLE_RATE


@dataclass
class CQTSettings:
    """nnAudio CQT arguments; defaults are MERT's (thesis eq. 3.3)."""

    sample_rate: int = SAMPLE_RATE
    hop_length: int = HOP_LENGTH
    fmin: float = 32.7
    n_bins: int = 336
    bins_per_octave: int = 48
    filter_scale: float = 1.0
    norm: int = 1
    window: str = "hann"
    pad_mode: str = "constant"


class CQTTeacher(nn.Module):
    """Raw CQT magnitudes [B, frames, n_bins] of audio [B, samples], computed in float32."""

    def __init__(self, settings: CQTSettings | None = None):
        super().__init__()
        s = settings or CQTSettings()
        self.transform = CQT(
            sr=s.sample_rate,
            hop_length=s.hop_length,
            fmin=s.fmin,
            n_bins=s.n_bins,
            bins_per_octave=s.bins_per_octave,
            filter_scale=s.filter_scale,
            norm=s.norm,
            window=s.window,
            center=True,
            pad_mode=s.pad_mode,
            output_format="Magnitude",
            verbose=False,
        )

    @torch.no_grad()
    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return self.transform(wav.float()).transpose(1, 2)
