"""Token-level similarity between datasets (thesis 4.3).

A dataset is summarised by one histogram per codebook of the tokens of all its frames: the 8
EnCodec codebooks of 1,024 codes of a token cache (`culturemert.targets.token_cache`), or the
single "codebook" of k-means clusters of `semantic_tokens`. Two datasets are compared codebook by
codebook with the Jensen-Shannon divergence of their code distributions (base 2, so in [0, 1]; the
square of scipy's Jensen-Shannon distance) and the cosine distance of their histograms, each
averaged over the codebooks. Token caches are only compared when one teacher made them all (the
identity each cache records), since the codes of two teachers are not the same vocabulary.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy.spatial.distance import cosine, jensenshannon

from culturemert.errors import UserError, listing
from culturemert.targets.token_cache import TokenCache, TokenCacheError

BLOCK_FRAMES = 1 << 20  # frames of codes.npy counted per step, bounding memory

PathLike = str | os.PathLike


class SimilarityError(UserError):
    """Inputs that cannot be compared; the message names the folder or file."""


def code_histograms(cache_dir: PathLike) -> np.ndarray:
    """Counts int64 [codebooks, codebook_size] of the codes of a complete token cache folder."""
    return _count_codes(_open(cache_dir))


def teacher_histograms(cache_dirs: Sequence[PathLike]) -> list[np.ndarray]:
    """`code_histograms` of each cache, refusing caches made by different teachers."""
    caches = [_open(path) for path in cache_dirs]
    by_teacher: dict[str, list[Path]] = {}
    for cache in caches:
        by_teacher.setdefault(json.dumps(cache.meta.get("teacher"), sort_keys=True), []).append(cache.out_dir)
    if len(by_teacher) > 1:
        groups = "; ".join(f"{listing(paths)} by teacher {teacher}" for teacher, paths in by_teacher.items())
        raise SimilarityError(
            f"the token caches were made by {len(by_teacher)} different teachers ({groups}); extract all "
            "of them with the same teacher (extract_tokens.py --encodec, or --save-teacher once)"
        )
    return [_count_codes(cache) for cache in caches]


def dataset_names(paths: Sequence[PathLike]) -> list[str]:
    """Names of datasets from their folders: the path components where the folders differ, so
    ``data/makam/tokens/train`` and ``data/lyra/tokens/train`` are ``makam`` and ``lyra``; a single
    folder is named by its last component."""
    parts = [Path(path).resolve().parts for path in paths]
    if len(parts) == 1:
        return [parts[0][-1]]
    prefix = 0
    while all(len(p) > prefix + 1 and p[prefix] == parts[0][prefix] for p in parts):
        prefix += 1
    suffix = 0
    while all(len(p) - suffix - 1 > prefix and p[-suffix - 1] == parts[0][-suffix - 1] for p in parts):
        suffix += 1
    return ["/".join(p[prefix : len(p) - suffix]) or p[-1] for p in parts]


def _open(cache_dir: PathLike) -> TokenCache:
    try:
        return TokenCache.open(cache_dir)
    except TokenCacheError as error:
        raise SimilarityError(str(error)) from None


def _count_codes(cache: TokenCache) -> np.ndarray:
    meta, codes = cache.meta, cache.codes
    size = meta["codebook_size"]
    counts = np.zeros((codes.shape[1], size), dtype=np.int64)
    for start in range(0, len(codes), BLOCK_FRAMES):
        block = np.asarray(codes[start : start + BLOCK_FRAMES], dtype=np.int64)
        if block.size and block.max() >= size:
            raise SimilarityError(f"{cache.out_dir}: a code exceeds the codebook size {size} of meta.json")
        for codebook in range(codes.shape[1]):
            counts[codebook] += np.bincount(block[:, codebook], minlength=size)
    if counts.sum() == 0:
        raise SimilarityError(f"{cache.out_dir}: the cache holds no frames")
    return counts


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2) of two histograms, each normalised to a distribution."""
    return float(jensenshannon(p / p.sum(), q / q.sum(), base=2) ** 2)


def cosine_distance(p: np.ndarray, q: np.ndarray) -> float:
    """1 - cosine similarity of two histograms."""
    return float(cosine(p, q))


def pairwise_distances(histograms: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Symmetric [datasets, datasets] matrices ``js_divergence`` and ``cosine_distance`` of
    histograms [codebooks, bins] (one per dataset), each the mean over the codebooks."""
    shapes = {histogram.shape for histogram in histograms}
    if len(shapes) != 1:
        raise SimilarityError(f"histograms of different shapes cannot be compared: {sorted(shapes)}")
    size = len(histograms)
    matrices = {"js_divergence": np.zeros((size, size)), "cosine_distance": np.zeros((size, size))}
    for i in range(size):
        for j in range(i + 1, size):
            pairs = list(zip(histograms[i], histograms[j]))
            matrices["js_divergence"][i, j] = np.mean([js_divergence(p, q) for p, q in pairs])
            matrices["cosine_distance"][i, j] = np.mean([cosine_distance(p, q) for p, q in pairs])
    for matrix in matrices.values():
        matrix += matrix.T
    return matrices


def write_matrix_csv(path: PathLike, names: Sequence[str], matrix: np.ndarray) -> Path:
    """A square CSV: a header of `names`, then one row per name."""
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", *names])
        for name, row in zip(names, matrix):
            writer.writerow([name, *(f"{value:.6f}" for value in row)])
    return path


def plot_heatmap(path: PathLike, names: Sequence[str], matrix: np.ndarray, title: str) -> Path:
    """The matrix as an annotated heatmap PNG; colours span the off-diagonal values, so the zero
    diagonal does not flatten the differences between datasets."""
    size = len(names)
    off_diagonal = matrix[~np.eye(size, dtype=bool)] if size > 1 else matrix.ravel()
    low, high = off_diagonal.min(), off_diagonal.max()
    figure = Figure(figsize=(1.6 + 0.9 * size, 1.2 + 0.8 * size), layout="constrained")
    axis = figure.subplots()
    image = axis.imshow(matrix, cmap="viridis", vmin=low, vmax=high if high > low else low + 1e-12)
    axis.set_xticks(range(size), names, rotation=45, ha="right")
    axis.set_yticks(range(size), names)
    threshold = (low + high) / 2
    for i in range(size):
        for j in range(size):
            color = "black" if matrix[i, j] > threshold else "white"
            axis.text(j, i, f"{matrix[i, j]:.3f}", ha="center", va="center", color=color, fontsize="small")
    axis.set_title(title)
    figure.colorbar(image, ax=axis)
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def write_similarity(
    names: Sequence[str], histograms: Sequence[np.ndarray], out_dir: PathLike, prefix: str = ""
) -> dict[str, Path]:
    """Write ``<prefix>js_divergence`` and ``<prefix>cosine_distance`` as CSV and heatmap PNG into
    `out_dir`; returns the files by name."""
    if len(names) != len(histograms) or len(set(names)) != len(names):
        raise SimilarityError(f"need one distinct name per dataset, got {list(names)} for {len(histograms)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    titles = {"js_divergence": "Jensen-Shannon divergence", "cosine_distance": "cosine distance"}
    for measure, matrix in pairwise_distances(histograms).items():
        stem = f"{prefix}{measure}"
        written[f"{stem}.csv"] = write_matrix_csv(out_dir / f"{stem}.csv", names, matrix)
        title = f"{prefix.replace('_', ' ')}{titles[measure]}"
        written[f"{stem}.png"] = plot_heatmap(out_dir / f"{stem}.png", names, matrix, title)
    return written
