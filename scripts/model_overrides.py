"""Print the Hydra overrides that give ``model`` the architecture of a checkpoint.

Continued pre-training cannot change the architecture, so scripts/run_cpt.sh passes these to
fairseq-hydra-train next to ``checkpoint.finetune_from_model``. One override per line, each
one command-line argument (``mapfile -t overrides < <(python scripts/model_overrides.py X)``):

    python scripts/model_overrides.py runs/makam/init.pt
    ++model.conv_feature_layers='[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2'
    ++model.conv_bias=false
    ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from culturemert.checkpoint import CheckpointError, read_fairseq, read_hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("checkpoint", help="fairseq .pt or HF folder")
    args = parser.parse_args(argv)
    try:
        cfg, _ = read_hf(args.checkpoint) if Path(args.checkpoint).is_dir() else read_fairseq(args.checkpoint)
    except (CheckpointError, ValueError) as error:
        print(f"model_overrides: {error}", file=sys.stderr)
        return 2
    for name, value in cfg.architecture().items():
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, str):
            value = f"'{value}'"
        print(f"++model.{name}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
