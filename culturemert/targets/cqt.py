"""The musical teacher: constant-Q transform magnitudes of the clean audio (thesis eq. 3.3).

nnAudio builds the CQT kernels with the MERT release's settings; nnAudio's own forward convolves
the audio with all 336 kernels zero-padded to the longest (65,536 samples at 32.7 Hz), although
the kernel of bin k is non-zero on only about Q sr / f_k samples (394 at the top bin). The
teacher convolves each group of neighbouring bins with its kernels cut to the samples where the
group is non-zero: the same sums without the products with exact zeros, about 4x less work on
CPU, equal to nnAudio's output up to float rounding (tests/test_cqt.py).
Alignment: with ``center=True`` CQT frame t is centred on sample 320 t, so a crop of n samples
gives ``n // 320 + 1`` frames (376 for 5 s) while the model gives 374; like fairseq's HuBERT
(``forward_targets``) the first frames are kept and the trailing extra ones dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from nnAudio.features import CQT
from torch import nn
from torch.nn.functional import conv1d

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


def nnaudio_cqt(settings: CQTSettings) -> CQT:
    """nnAudio's CQT module at `settings` (its kernels are the teacher's; thesis eq. 3.3)."""
    s = settings
    return CQT(
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


class CQTTeacher(nn.Module):
    """Raw CQT magnitudes [B, frames, n_bins] of audio [B, samples], computed in float32 with
    nnAudio's kernels, bins convolved in groups of `group_bins` (a quarter octave by default)."""

    def __init__(self, settings: CQTSettings | None = None, group_bins: int = 12):
        super().__init__()
        s = settings or CQTSettings()
        if s.pad_mode != "constant":
            raise ValueError(f"CQTTeacher pads with zeros (pad_mode 'constant'), not {s.pad_mode!r}")
        reference = nnaudio_cqt(s)
        self.hop_length = s.hop_length
        self.width = reference.kernel_width
        kernels = torch.cat([reference.cqt_kernels_real, -reference.cqt_kernels_imag], 1)
        kernels = kernels * reference.lenghts.sqrt().view(-1, 1, 1)  # nnAudio's "librosa" scale
        self.offsets: list[int] = []
        for index, start in enumerate(range(0, s.n_bins, group_bins)):
            group = kernels[start : start + group_bins]  # [bins, (real, imag), width]
            support = group.abs().amax(dim=(0, 1)).nonzero().squeeze(1)
            first, last = int(support[0]), int(support[-1]) + 1
            self.offsets.append(first)
            self.register_buffer(
                f"group{index}", group[:, :, first:last].reshape(-1, 1, last - first), persistent=False
            )

    @torch.no_grad()
    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(wav.float(), (self.width // 2, self.width // 2)).unsqueeze(1)
        frames = (padded.shape[-1] - self.width) // self.hop_length + 1
        magnitudes = []
        for index, offset in enumerate(self.offsets):
            kernels = getattr(self, f"group{index}")
            both = conv1d(padded[..., offset:], kernels, stride=self.hop_length)[..., :frames]
            both = both.view(both.shape[0], -1, 2, frames)  # [B, bins, (real, imag), frames]
            magnitudes.append(both.pow(2).sum(2).sqrt())
        return torch.cat(magnitudes, 1).transpose(1, 2)
