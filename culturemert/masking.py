"""Span masking of frames for masked prediction (thesis 3.2; HuBERT/wav2vec 2.0 style).

The project's own vectorised version of fairseq's ``compute_mask_indices`` with overlapping
spans: each example of valid length ``n`` gets ``floor(mask_prob * n / span + u)`` span starts
(``u ~ U[0, 1)``, at least ``min_spans``) drawn without replacement from ``[0, n - span]``, and
every frame inside a span is masked. Spans may overlap, so the masked fraction is below
``mask_prob`` (about 1 - exp(-mask_prob) for long clips).
"""

from __future__ import annotations

import torch


def span_mask(
    valid_lengths: torch.Tensor,
    num_frames: int,
    mask_prob: float,
    span: int,
    min_spans: int = 2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boolean mask [B, num_frames]; True marks a masked frame; padding is never masked.

    ``valid_lengths`` [B] holds each example's number of non-padding frames. Seeded through
    ``generator`` (or torch's global RNG), on the device of ``valid_lengths``.
    """
    device = valid_lengths.device
    batch = valid_lengths.shape[0]
    lengths = valid_lengths.to(torch.float64)
    uniform = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
    num_spans = torch.floor(mask_prob * lengths / span + uniform).long()
    num_starts = (valid_lengths - span + 1).clamp(min=0)
    num_spans = num_spans.clamp(min=min_spans).minimum(num_starts)

    max_starts = max(num_frames - span + 1, 1)
    # Random scores, -1 where a start is invalid; the top-k scores give k distinct starts.
    scores = torch.rand(batch, max_starts, generator=generator, device=device)
    positions = torch.arange(max_starts, device=device)
    scores = scores.masked_fill(positions[None, :] >= num_starts[:, None], -1.0)
    order = scores.argsort(dim=1, descending=True)
    chosen = torch.arange(max_starts, device=device)[None, :] < num_spans[:, None]

    starts = torch.zeros(batch, num_frames + 1, dtype=torch.int32, device=device)
    starts.scatter_add_(1, order, chosen.to(torch.int32))
    ends = torch.zeros_like(starts)
    ends[:, span:].copy_(starts[:, : num_frames + 1 - span])
    # Number of open spans at each frame: started minus finished.
    open_spans = (starts - ends).cumsum(dim=1)[:, :num_frames]
    return open_spans > 0
