"""Write a randomly initialised MERT checkpoint (fairseq .pt) from a model YAML.

python scripts/init_model.py --config configs/model/tiny.yaml --out runs/tiny_init.pt --seed 0
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from culturemert.checkpoint import save_fairseq
from culturemert.cli import command
from culturemert.errors import UserError
from culturemert.files import writing
from culturemert.training.start import random_start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True, help="model YAML (configs/model/*.yaml)")
    parser.add_argument("--out", required=True, help="checkpoint to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if str(args.out).endswith(("/", os.sep)):
        raise UserError(f"--out {args.out}: a .pt file is written; give a file name such as init.pt")
    with writing(args.out):  # a second writer of the same file is refused
        start = random_start(args.config, args.seed)
        save_fairseq(args.out, start.cfg, start.state)
    count = sum(value.numel() for value in start.state.values())
    print(f"wrote {args.out}: random MERT ({count:,} parameters, seed {args.seed})")
    return 0


entry = command(main, "init_model")
