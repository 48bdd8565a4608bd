"""Check the inputs of a continual pre-training run before training starts (scripts/run_cpt.sh).

    python scripts/check_stage_data.py --manifests data_manifests/makam \
        --tokens data_manifests/makam/tokens --stages 1 2

Every ``<manifests>/stage<n>/{train,valid}.tsv`` must parse and list clips, and every token cache
``<tokens>/stage<n>/<split>/`` must be complete and built from exactly that manifest. Problems
are printed one per line and the exit status is 2, so that they are not discovered as a
traceback from inside the training loop.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from culturemert.data.manifest import ManifestError, read_manifest
from culturemert.targets.token_cache import TokenCache, TokenCacheError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--manifests", type=Path, required=True, help="folder with stage<n>/ manifests")
    parser.add_argument("--tokens", type=Path, required=True, help="folder with stage<n>/<split>/ caches")
    parser.add_argument("--stages", nargs="+", default=["1", "2"])
    args = parser.parse_args(argv)
    problems = []
    for stage in args.stages:
        for split in ("train", "valid"):
            try:
                manifest = read_manifest(args.manifests / f"stage{stage}" / f"{split}.tsv")
                TokenCache.open(args.tokens / f"stage{stage}" / split, manifest)
            except (ManifestError, TokenCacheError) as error:
                problems.append(str(error))
    for problem in problems:
        print(f"check_stage_data: {problem}", file=sys.stderr)
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
