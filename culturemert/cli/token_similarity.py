"""Token-level similarity between datasets (thesis 4.3): Jensen-Shannon divergence and cosine
distance of code distributions, averaged over codebooks, as CSV matrices and heatmap PNGs.

python scripts/token_similarity.py --caches tokens/makam tokens/hindustani tokens/carnatic tokens/lyra \\
    --names makam hindustani carnatic lyra --out reports/tokens
python scripts/token_similarity.py --semantic --model weights/MERT-v1-95M_fairseq.pt --layer 7 --k 500 \\
    --caches tokens/makam tokens/lyra --names makam lyra --out reports/semantic
python scripts/token_similarity.py --semantic --model runs/tiny.pt --layer 2 --k 50 \\
    --manifests data_manifests/makam/stage2/train.tsv data_manifests/lyra/stage2/train.tsv --out reports/sem

Acoustic (default): the 8 EnCodec codebooks of each token cache (scripts/extract_tokens.py).
--semantic: k-means clusters of one layer's frame features, computed on the audio of the manifests
the caches were built from (or of --manifests). Names default to the parts of the input paths
that differ (--caches data_manifests/*/tokens/stage2/train names each by its data_manifests
folder). Token caches made by different teachers are refused. Writes
<prefix>js_divergence.{csv,png}, <prefix>cosine_distance.{csv,png} and <prefix>histograms.npz,
prefix "semantic_" with --semantic. Exits with status 2 and a one-line message on bad inputs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from culturemert.cli import command
from culturemert.files import write_atomically
from culturemert.probing.semantic_tokens import CLIP_SECONDS, FIT_FRAMES, MAX_CLIPS, semantic_histograms
from culturemert.probing.token_similarity import (
    SimilarityError,
    dataset_names,
    teacher_histograms,
    write_similarity,
)


def _manifests(args: argparse.Namespace) -> list[Path]:
    """The manifests of --manifests, or those the token caches of --caches were built from."""
    if args.manifests:
        return args.manifests
    manifests = []
    for cache in args.caches:
        meta_path = cache / "meta.json"
        if not meta_path.is_file():
            raise SimilarityError(f"{cache}: not a complete token cache (no meta.json)")
        manifests.append(Path(json.loads(meta_path.read_text())["manifest"]))
    return manifests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="token_similarity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--caches", nargs="+", type=Path, help="token cache folders, one per dataset")
    inputs.add_argument("--manifests", nargs="+", type=Path, help="--semantic only: audio manifests")
    parser.add_argument("--names", nargs="+", help="dataset names (default: where the input paths differ)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the CSVs and PNGs")
    parser.add_argument("--semantic", action="store_true", help="k-means tokens of --layer instead")
    parser.add_argument("--model", type=Path, help="--semantic: fairseq .pt or HF folder")
    parser.add_argument("--layer", type=int, help="--semantic: hidden state 0..12")
    parser.add_argument("--k", type=int, default=500, help="--semantic: clusters")
    parser.add_argument(
        "--clip-seconds", type=float, default=CLIP_SECONDS, help="--semantic: seconds per clip"
    )
    parser.add_argument("--max-clips", type=int, default=MAX_CLIPS, help="--semantic: clips per dataset")
    parser.add_argument("--fit-frames", type=int, default=FIT_FRAMES, help="--semantic: k-means sample size")
    parser.add_argument("--normalize", action="store_true", help="--semantic: zero-mean unit-variance audio")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.semantic and (args.model is None or args.layer is None):
        parser.error("--semantic needs --model and --layer")
    if args.manifests and not args.semantic:
        parser.error("--manifests is for --semantic; acoustic tokens come from --caches")
    sources = args.caches or args.manifests
    names = args.names or dataset_names([path if path.is_dir() else path.parent for path in sources])
    if len(names) != len(sources):
        parser.error(f"{len(names)} names for {len(sources)} datasets")
    if args.semantic:
        histograms = semantic_histograms(
            args.model,
            _manifests(args),
            args.layer,
            args.k,
            args.clip_seconds,
            args.max_clips,
            args.fit_frames,
            args.normalize,
            args.device,
        )
    else:
        histograms = teacher_histograms(args.caches)
    prefix = "semantic_" if args.semantic else ""
    written = write_similarity(names, histograms, args.out, prefix)
    counts = {"names": np.asarray(names), "counts": np.stack(histograms)}
    write_atomically(args.out / f"{prefix}histograms.npz", lambda handle: np.savez(handle, **counts))
    for measure in ("js_divergence", "cosine_distance"):
        print(f"{measure}:\n{written[f'{prefix}{measure}.csv'].read_text()}")
    print("wrote " + ", ".join(str(path) for path in written.values()))
    return 0


entry = command(main, "token_similarity")
