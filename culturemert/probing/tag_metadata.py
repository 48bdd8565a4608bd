"""Tag metadata from the user: recording id -> tag names, for the Dunya datasets (thesis 3.5.2).

Dunya's metadata for makam, Hindustani and Carnatic is not redistributable, so the user passes it
(``probe.py extract --metadata``) in one of these layouts:

- a JSON object of recording id -> list of tag names (or one ``|``-separated string), the layout
  of the shipped ``fma/metadata.json``;
- a CSV (``.csv``) or TSV (``.tsv``) table of ``id,tags`` rows, header optional, tags separated
  by ``|``;
- a pickled ``.npy`` dict (the layout the ISMIR 2023 code used): loading a pickle can run code,
  so it is refused unless the user trusts the file (``trust_pickle``, ``--trust-pickle``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from culturemert.data.splits import table_rows
from culturemert.errors import UserError

TAG_SEPARATOR = "|"


class MetadataError(UserError):
    """Tag metadata that cannot be read; the message names the file and the layouts accepted."""


def _metadata_npy(path: Path, trust_pickle: bool) -> dict:
    if not trust_pickle:
        raise MetadataError(
            f"{path}: a .npy metadata dict is a pickle, and loading one can run code; convert it to "
            "JSON (id -> list of tags) or an id,tags CSV/TSV, or pass --trust-pickle if you trust the file"
        )
    try:
        return np.load(path, allow_pickle=True).item()
    except (OSError, ValueError) as error:
        raise MetadataError(f"{path}: not a pickled dict of id -> tags ({error})") from error


def _metadata_table(path: Path) -> dict[str, list[str]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    metadata: dict[str, list[str]] = {}
    for number, row in table_rows(path, ["id", "tags"], delimiter):
        if len(row) != 2 or row[0].strip() in metadata:
            problem = "a repeated id" if len(row) == 2 else f"expected 'id{delimiter}tags'"
            raise MetadataError(f"{path}:{number}: {problem}, got {row}")
        metadata[row[0].strip()] = row[1].split(TAG_SEPARATOR)
    return metadata


def read_metadata(path: str | os.PathLike, trust_pickle: bool = False) -> dict[str, list[str]]:
    """Tag metadata, recording id -> tag names, from a JSON object, a CSV/TSV table of ``id,tags``
    rows (tags ``|``-separated) or, only with `trust_pickle`, a pickled ``.npy`` dict."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(
            f"{path}: no such tag metadata file; pass --metadata with a JSON, CSV or TSV file"
        )
    extension = path.suffix.lower()
    if extension == ".npy":
        metadata = _metadata_npy(path, trust_pickle)
    elif extension in (".csv", ".tsv"):
        metadata = _metadata_table(path)
    elif extension == ".json":
        try:
            metadata = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise MetadataError(f"{path}: not valid JSON ({error})") from error
    else:
        raise MetadataError(f"{path}: tag metadata must be a .json, .csv or .tsv file")
    if not isinstance(metadata, dict) or not all(isinstance(tags, (list, str)) for tags in metadata.values()):
        raise MetadataError(f"{path}: expected a mapping of recording id -> list of tags")
    return {
        str(key): [
            str(tag).strip()
            for tag in (tags.split(TAG_SEPARATOR) if isinstance(tags, str) else tags)
            if str(tag).strip()
        ]
        for key, tags in metadata.items()
    }
