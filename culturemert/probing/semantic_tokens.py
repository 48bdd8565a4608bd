"""Semantic tokens: k-means clusters of one layer's frame features (thesis 4.3, an extension).

Each dataset is a fairseq manifest of 24 kHz audio (the one a token cache was built from). From
each, `max_clips` rows are drawn with a fixed seed and the first `clip_seconds` of each are
encoded by the frozen model; the frames of hidden state `layer` are kept as float16. k-means
(scikit-learn ``MiniBatchKMeans``, seeded) is fit on at most `fit_frames` frames drawn equally
from every dataset, so no dataset dominates the clusters, and every kept frame is assigned to its
nearest centre. A dataset's histogram of cluster ids is one "codebook" of k bins, compared across
datasets by `token_similarity`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans
from tqdm import tqdm

from culturemert.audio import SAMPLE_RATE, read_crop
from culturemert.checkpoint import load_model
from culturemert.data.manifest import read_manifest
from culturemert.models.mert import MertModel
from culturemert.probing.chunking import normalize as normalize_wav
from culturemert.probing.token_similarity import SimilarityError

CLIP_SECONDS = 30.0
MAX_CLIPS = 64
FIT_FRAMES = 200_000
SEED = 0

PathLike = str | os.PathLike


def layer_frames(
    model: MertModel,
    manifest_path: PathLike,
    layer: int,
    clip_seconds: float = CLIP_SECONDS,
    max_clips: int = MAX_CLIPS,
    normalize: bool = False,
    device: str | torch.device = "cpu",
    seed: int = SEED,
) -> np.ndarray:
    """float16 [frames, dim] of hidden state `layer` over the clips drawn from a manifest."""
    manifest = read_manifest(manifest_path)
    rows = np.random.default_rng(seed).permutation(len(manifest))[:max_clips]
    frames = []
    for row in tqdm(sorted(rows.tolist()), unit="clip", desc=Path(manifest_path).name, leave=False):
        num_samples = min(int(manifest.num_samples[row]), round(clip_seconds * SAMPLE_RATE))
        wav = read_crop(manifest.audio_path(row), 0, num_samples)
        if normalize:
            wav = normalize_wav(wav)
        with torch.inference_mode():
            states = model.hidden_states(torch.from_numpy(wav)[None].to(device), layers=layer)
        frames.append(states[layer][0].to(torch.float16).cpu().numpy())
    return np.concatenate(frames)


def cluster_histograms(
    frames: Sequence[np.ndarray], k: int, fit_frames: int = FIT_FRAMES, seed: int = SEED
) -> list[np.ndarray]:
    """Fit k-means on frames drawn equally from every dataset; count each dataset's frames per
    cluster. Returns one int64 [1, k] histogram per dataset."""
    rng = np.random.default_rng(seed)
    share = max(1, fit_frames // len(frames))
    sample = np.concatenate(
        [items[rng.choice(len(items), size=min(share, len(items)), replace=False)] for items in frames]
    ).astype(np.float32)
    if len(sample) < k:
        raise SimilarityError(
            f"{len(sample)} frames cannot make k={k} clusters; use more clips or a smaller k"
        )
    kmeans = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=4096).fit(sample)
    return [np.bincount(kmeans.predict(items.astype(np.float32)), minlength=k)[None] for items in frames]


def semantic_histograms(
    model_path: PathLike,
    manifests: Sequence[PathLike],
    layer: int,
    k: int,
    clip_seconds: float = CLIP_SECONDS,
    max_clips: int = MAX_CLIPS,
    fit_frames: int = FIT_FRAMES,
    normalize: bool = False,
    device: str | torch.device = "cpu",
    seed: int = SEED,
) -> list[np.ndarray]:
    """The cluster histograms [1, k] of each manifest's frames of `layer` (module docstring)."""
    model = load_model(model_path, device)
    layers = model.cfg.encoder_layers + 1
    if not 0 <= layer < layers:
        raise SimilarityError(f"layer {layer}: {model_path} has hidden states 0..{layers - 1}")
    frames = [
        layer_frames(model, manifest, layer, clip_seconds, max_clips, normalize, device, seed)
        for manifest in manifests
    ]
    return cluster_histograms(frames, k, fit_frames, seed)
