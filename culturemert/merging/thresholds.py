"""TIES' trim thresholds: each task vector's k-th largest magnitude, exact, in two streamed passes."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class MagnitudeThresholds:
    """Each task vector's k_i-th largest magnitude, exact, from two streamed passes (TIES' trim).

    Radix selection on float32 bit patterns, which order as the values do for x >= 0: the first
    pass counts the upper 16 bits and finds the bucket holding the k-th largest magnitude, the
    second counts the lower 16 bits inside that bucket. Memory: two 65,536-bin counts per task.
    Call ``add`` on every tensor's task vectors, ``end_first_pass``, ``add`` on all again, then
    ``thresholds``.
    """

    def __init__(self, ks: Sequence[int]):
        self.ks = torch.tensor(ks, dtype=torch.int64)
        self.high = torch.zeros(len(ks), 1 << 16, dtype=torch.int64)
        self.low = torch.zeros_like(self.high)
        self.bucket: torch.Tensor | None = None
        self.rank: torch.Tensor | None = None

    def add(self, taus: torch.Tensor) -> None:
        """Count the magnitudes of one tensor's task vectors ``taus`` [N, ...]."""
        bits = taus.abs().to(torch.float32).view(torch.int32).reshape(len(self.ks), -1)
        for i, row in enumerate(bits):
            if self.bucket is None:
                self.high[i] += torch.bincount(row >> 16, minlength=1 << 16)
            else:
                inside = row[(row >> 16) == self.bucket[i]]
                self.low[i] += torch.bincount(inside & 0xFFFF, minlength=1 << 16)

    def end_first_pass(self) -> None:
        self.bucket, self.rank = _select(self.high, self.ks)

    def thresholds(self) -> torch.Tensor:
        """float32 [N]: TIES keeps |tau_i| >= thresholds[i] (k_i or more entries, more on ties);
        +inf where k_i = 0."""
        low, _ = _select(self.low, self.rank)
        values = ((self.bucket << 16) | low).to(torch.int32).view(torch.float32)
        return torch.where(self.ks > 0, values, torch.inf)


def _select(counts: torch.Tensor, ks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of bucket ``counts`` [N, B]: the bucket holding the k-th largest element, and that
    element's rank from the top among the bucket's elements."""
    at_or_above = counts.flip(1).cumsum(1).flip(1)
    bucket = ((at_or_above >= ks[:, None]).sum(1) - 1).clamp(min=0)
    above = at_or_above.gather(1, bucket[:, None])[:, 0] - counts.gather(1, bucket[:, None])[:, 0]
    return bucket, ks - above
