"""Write a randomly initialised MERT checkpoint (fairseq .pt) from a model YAML.

python scripts/init_model.py --config configs/model/tiny.yaml --out runs/tiny_init.pt --seed 0
"""

from __future__ import annotations

import argparse
import sys

import torch
import yaml

from culturemert.checkpoint import save_fairseq
from culturemert.models.mert import MertConfig, MertModel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", required=True, help="model YAML (configs/model/*.yaml)")
    parser.add_argument("--out", required=True, help="checkpoint to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with open(args.config) as f:
        values = yaml.safe_load(f)
    unknown = sorted(set(values) - set(MertConfig.__dataclass_fields__))
    if unknown:
        print(f"init_model: {args.config}: unknown model fields {', '.join(unknown)}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    cfg = MertConfig(**values)
    model = MertModel(cfg)
    save_fairseq(args.out, cfg, model.state_dict())
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: random MERT ({count:,} parameters, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
