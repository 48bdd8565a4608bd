"""Rendered music in place of a dataset, for the tiny experiment (`culturemert.music_corpus`).

Each domain renders its collections into ``<folder>/audio/<domain>/`` and is split into
train/valid/test by a seeded shuffle, written twice: ``<domain>_split.csv`` (``path,split``,
for ``prepare_data.py --split``) and ``<domain>.csv`` (``path,split,tags``, a probing task whose
tags are the domain's chosen tags of each piece, such as its key, tuning or instrument).
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

from culturemert.experiment.config import Render
from culturemert.music_corpus import render_collection


def split_of(count: int, name: str, seed: int, shares: dict[str, float]) -> list[str]:
    """The split of each of `count` items: a seeded shuffle cut by `shares` (split -> share;
    the last split takes what is left)."""
    order = list(range(count))
    random.Random(f"{name}/{seed}").shuffle(order)
    splits, start = [""] * count, 0
    for position, (split, share) in enumerate(shares.items()):
        size = round(share * count) if position < len(shares) - 1 else count - start
        for index in order[start : start + size]:
            splits[index] = split
        start += size
    return splits


def render_domains(render: Render, folder: Path) -> None:
    """Render every domain and write its split and task CSVs into `folder` (module docstring)."""
    audio = folder / "audio"
    for name, domain in render.domains.items():
        pieces = [
            piece
            for collection, count in domain.collections.items()
            for piece in render_collection(
                collection,
                audio / name,
                count,
                render.seed,
                render.seconds,
                domain.instruments,
                domain.tunings,
                domain.transpose,
                workers=os.cpu_count() or 1,  # the files do not depend on it
            )
        ]
        splits = split_of(len(pieces), name, render.seed, render.split)
        with open(folder / f"{name}_split.csv", "w", newline="") as split_file:
            rows = csv.writer(split_file)
            rows.writerow(["path", "split"])
            rows.writerows([path.relative_to(audio), split] for (path, _), split in zip(pieces, splits))
        with open(folder / f"{name}.csv", "w", newline="") as task_file:
            rows = csv.writer(task_file)
            rows.writerow(["path", "split", "tags"])
            for (path, tags), split in zip(pieces, splits):
                labels = "|".join(f"{key}={tags[key]}" for key in domain.tags if key in tags)
                rows.writerow([path.relative_to(audio), split, labels])
