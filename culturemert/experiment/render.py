"""Rendered music in place of a dataset, for the tiny experiment (`culturemert.music_corpus`).

Each domain renders its collections into ``<folder>/audio/<collection>/`` and is split 60/20/20
into train/valid/test by a seeded shuffle, written twice: ``<domain>_split.csv`` (``path,split``,
for ``prepare_data.py --split``) and ``<domain>.csv`` (``path,split,tags``, a probing task whose
tags are the pieces' collection, tune type or region, instrument and tempo bucket).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from culturemert.music_corpus import render_collection

SPLIT_SHARES = (("train", 0.6), ("valid", 0.2), ("test", 0.2))
TAG_FIELDS = ("collection", "tune_type", "region", "instrument", "tempo")


def split_of(count: int, name: str, seed: int) -> list[str]:
    """The split of each of `count` items: a seeded shuffle cut by `SPLIT_SHARES`."""
    order = list(range(count))
    random.Random(f"{name}/{seed}").shuffle(order)
    splits, start = [""] * count, 0
    for split, share in SPLIT_SHARES:
        size = round(share * count) if split != "test" else count - start
        for index in order[start : start + size]:
            splits[index] = split
        start += size
    return splits


def render_domains(domains: dict[str, dict[str, int]], folder: Path, seconds: float, seed: int) -> None:
    """Render every domain and write its split and task CSVs into `folder` (module docstring)."""
    audio = folder / "audio"
    for domain, collections in domains.items():
        pieces = [
            piece
            for collection, count in collections.items()
            for piece in render_collection(collection, audio / collection, count, seed, max_seconds=seconds)
        ]
        splits = split_of(len(pieces), domain, seed)
        with open(folder / f"{domain}_split.csv", "w", newline="") as split_file:
            rows = csv.writer(split_file)
            rows.writerow(["path", "split"])
            rows.writerows([path.relative_to(audio), split] for (path, _), split in zip(pieces, splits))
        with open(folder / f"{domain}.csv", "w", newline="") as task_file:
            rows = csv.writer(task_file)
            rows.writerow(["path", "split", "tags"])
            for (path, tags), split in zip(pieces, splits):
                labels = "|".join(f"{key}={tags[key]}" for key in TAG_FIELDS if key in tags)
                rows.writerow([path.relative_to(audio), split, labels])
