"""Random 5 s crops of pre-training clips, batched with padding masks (thesis 3.5.3).

Each item is a crop of ``crop_samples`` read from disk without decoding the rest of the file.
Crops start on a 320-sample frame boundary, so the EnCodec codes of a cached file line up with
the crop exactly: a crop starting at sample 320 f takes cached frames [f, f + frames). Clips
shorter than a crop are taken whole and padded in the batch; clips shorter than
``min_samples`` are dropped when the dataset is built (counted in the log).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from fairseq.data import FairseqDataset

from culturemert.audio import HOP_LENGTH, AudioError, read_crop
from culturemert.data.manifest import Manifest

logger = logging.getLogger(__name__)


class CropDataset(FairseqDataset):
    """Clips of a manifest, each read as one random frame-aligned crop per epoch.

    ``token_cache`` (a ``culturemert.targets.token_cache.TokenCache`` or None) supplies the
    EnCodec codes of each crop (ceil(length / 320) frames; the criterion keeps as many as the
    model has frames); without it codes are computed on the training device.
    Crop positions depend only on (seed, epoch, clip), so a resumed run reads the same crops.
    With ``skip_bad_audio`` an unreadable clip is logged and left out of its batch instead of
    stopping training.
    """

    def __init__(
        self,
        manifest: Manifest,
        crop_samples: int,
        min_samples: int,
        token_cache=None,
        seed: int = 1,
        skip_bad_audio: bool = False,
    ):
        super().__init__()
        keep = np.flatnonzero(manifest.num_samples >= min_samples)
        dropped = len(manifest) - len(keep)
        if dropped:
            logger.info(
                "%s: dropped %d of %d clips shorter than %d samples",
                manifest.path,
                dropped,
                len(manifest),
                min_samples,
            )
        if len(keep) == 0:
            raise ValueError(f"{manifest.path}: no clip is at least {min_samples} samples long")
        self.manifest = manifest
        self.rows = keep
        self.crop_samples = crop_samples
        self.token_cache = token_cache
        self.seed = seed
        self.skip_bad_audio = skip_bad_audio
        self.epoch = 1

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def can_reuse_epoch_itr_across_epochs(self) -> bool:
        return False

    def crop_length(self, index: int) -> int:
        return int(min(self.manifest.num_samples[self.rows[index]], self.crop_samples))

    def num_tokens(self, index: int) -> int:
        return self.crop_length(index)

    def size(self, index: int) -> int:
        return self.crop_length(index)

    def ordered_indices(self) -> np.ndarray:
        return np.random.default_rng((self.seed, self.epoch)).permutation(len(self))

    def crop_start_frame(self, index: int) -> int:
        """First frame of this epoch's crop of clip ``index``."""
        spare = int(self.manifest.num_samples[self.rows[index]]) - self.crop_length(index)
        rng = np.random.default_rng((self.seed, self.epoch, int(index)))
        return int(rng.integers(0, spare // HOP_LENGTH + 1))

    def __getitem__(self, index: int) -> dict | None:
        row = int(self.rows[index])
        start_frame = self.crop_start_frame(index)
        length = self.crop_length(index)
        path = self.manifest.audio_path(row)
        try:
            wav = read_crop(path, start_frame * HOP_LENGTH, length)
        except AudioError:
            if not self.skip_bad_audio:
                raise
            logger.warning("skipping unreadable clip %s", path, exc_info=True)
            return None
        item = {"id": index, "source": torch.from_numpy(wav)}
        if self.token_cache is not None:
            frames = -(-length // HOP_LENGTH)  # every code the crop overlaps
            codes = self.token_cache.codes_for(row, start_frame, frames)
            item["codes"] = torch.from_numpy(codes)
        return item

    def collater(self, samples: list[dict | None]) -> dict:
        """Pad to the longest crop: ``net_input`` {source [B, S], padding_mask [B, S] or None},
        ``codes`` [B, frames, 8] padded with -1 when cached, ``id`` [B], and ``skipped``, the
        number of clips left out as unreadable."""
        skipped = sum(s is None for s in samples)
        samples = [s for s in samples if s is not None]
        if not samples:
            return {}
        lengths = torch.tensor([len(s["source"]) for s in samples])
        longest = int(lengths.max())
        source = torch.zeros(len(samples), longest)
        for i, s in enumerate(samples):
            source[i, : len(s["source"])] = s["source"]
        padding_mask = None
        if (lengths < longest).any():
            padding_mask = torch.arange(longest)[None, :] >= lengths[:, None]
        batch = {
            "id": torch.tensor([s["id"] for s in samples]),
            "net_input": {"source": source, "padding_mask": padding_mask},
            "skipped": skipped,
        }
        if "codes" in samples[0]:
            frames = max(len(s["codes"]) for s in samples)
            codes = torch.full((len(samples), frames, samples[0]["codes"].shape[1]), -1, dtype=torch.long)
            for i, s in enumerate(samples):
                codes[i, : len(s["codes"])] = s["codes"]
            batch["codes"] = codes
        return batch
