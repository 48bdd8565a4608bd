"""In-batch noise mixture (thesis 3.2): mix segments of other clips into a clip.

With probability ``prob`` per example, 1 to ``max_segments`` segments of ``min_length`` to
``max_length`` samples, cut at random from other clips of the same batch, are added at random
positions (volume 1.0). Only the model input changes: targets are computed from the clean
audio beforehand. Vectorised over the batch; one pass per possible segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NoiseMixture:
    prob: float = 0.5
    max_segments: int = 3
    min_length: int = 12000
    max_length: int = 24000

    def __call__(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mixed copy of ``source`` [B, S]; padding stays zero. ``prob`` 0 returns ``source``."""
        batch, samples = source.shape
        if self.prob <= 0 or batch < 2:
            return source
        device = source.device
        chosen = torch.rand(batch, device=device) < self.prob
        num_segments = torch.randint(1, self.max_segments + 1, (batch,), device=device) * chosen
        positions = torch.arange(samples, device=device)[None, :]
        mixed = source.clone()
        for segment in range(self.max_segments):
            active = num_segments > segment
            other = (
                torch.arange(batch, device=device) + torch.randint(1, batch, (batch,), device=device)
            ) % batch
            length = torch.randint(self.min_length, self.max_length + 1, (batch,), device=device)
            length = length.clamp(max=samples)
            src_start = (torch.rand(batch, device=device) * (samples - length + 1)).long()
            dst_start = (torch.rand(batch, device=device) * (samples - length + 1)).long()
            offset = positions - dst_start[:, None]
            inside = (offset >= 0) & (offset < length[:, None]) & active[:, None]
            read_at = (src_start[:, None] + offset).clamp(0, samples - 1)
            mixed = mixed + torch.where(inside, source[other[:, None], read_at], 0.0)
        if padding_mask is not None:
            mixed = mixed.masked_fill(padding_mask, 0.0)
        return mixed
