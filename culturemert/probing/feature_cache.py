"""The feature cache folder that `features.extract_features` writes and the probe reads.

A cache folder holds

- ``features.npy``: float16 [chunks, layers, dim], memory-mapped by the probe;
- ``chunk_recording.npy``: int64 [chunks], the task row each chunk comes from (rows in order);
- ``labels.npy``: uint8 [recordings, tags];
- ``audio.json``: the size, mtime and sha256 of every audio file (`culturemert.fingerprint`);
- ``meta.json``: the task (name, checksum, ids, splits, tags), the model (name, path, sha256),
  the sha256 of the audio's contents, the chunking and normalisation settings, the precision,
  the shapes and the ids skipped for missing or unusable audio. It is written last, so its
  presence means the cache is complete. The model is identified by its sha256, so a moved
  checkpoint still matches its cache and reports tell two models of one folder name apart.

Opening checks every array against meta.json: a damaged or missing array of a cache marked
complete is one `FeatureCacheError` naming the folder, not a numpy traceback.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from culturemert.errors import UserError

PathLike = str | os.PathLike


class FeatureCacheError(UserError):
    """A feature cache that cannot be built or used; the message names the folder and the fix."""


def _damaged(path: Path, what: str, error: BaseException | str) -> FeatureCacheError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return FeatureCacheError(
        f"{path}: a cache marked complete whose {what} is damaged or missing ({reason}); "
        "delete the folder and re-extract with probe.py extract"
    )


def _load(path: Path, name: str, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path / name, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise _damaged(path, name, error) from None


@dataclass(frozen=True)
class FeatureCache:
    """A complete cache folder, its arrays memory-mapped (see the module docstring)."""

    path: Path
    features: np.ndarray
    chunk_recording: np.ndarray
    labels: np.ndarray
    meta: dict

    @classmethod
    def open(cls, path: PathLike) -> FeatureCache:
        """Open a complete cache, refusing an unfinished one, or a damaged or missing array or
        meta.json, or arrays that disagree with meta.json (one `FeatureCacheError`)."""
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise FeatureCacheError(
                f"{path}: not a complete feature cache (no meta.json); run probe.py extract"
            )
        try:
            meta = json.loads(meta_path.read_text())
            shape = (meta["chunks"], meta["layers"], meta["dim"])
            recordings, tags = len(meta["ids"]), len(meta["tags"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise _damaged(path, "meta.json", error) from None
        features = _load(path, "features.npy", mmap=True)
        chunk_recording = _load(path, "chunk_recording.npy")
        labels = _load(path, "labels.npy")
        shapes_agree = (
            features.shape == shape
            and chunk_recording.shape == (meta["chunks"],)
            and labels.shape == (recordings, tags)
        )
        if not shapes_agree:
            raise FeatureCacheError(
                f"{path}: arrays and meta.json disagree; delete the folder and re-extract"
            )
        if meta["chunks"] == 0:
            raise _damaged(path, "features.npy", "no chunks")
        return cls(path, features, chunk_recording, labels, meta)

    @property
    def ids(self) -> list[str]:
        return self.meta["ids"]

    @property
    def splits(self) -> list[str]:
        return self.meta["splits"]

    @property
    def tags(self) -> list[str]:
        return self.meta["tags"]


def check_complete(out_dir: Path, settings: dict) -> FeatureCache:
    """The complete cache in `out_dir`, refused when it was made from another task, model or
    settings, or when it is damaged."""
    cache = FeatureCache.open(out_dir)
    changed = sorted(key for key, value in settings.items() if cache.meta.get(key) != value)
    if changed:
        raise FeatureCacheError(
            f"{out_dir} already holds a complete cache made with other {', '.join(changed)}; delete it "
            "or pass another --out"
        )
    return cache
