"""Convert a MERT checkpoint between fairseq ``.pt`` and Hugging Face folder formats.

python scripts/convert_checkpoint.py MERT-v1-95M_fairseq.pt hf_out/      # .pt -> HF
python scripts/convert_checkpoint.py m-a-p/MERT-v1-95M/ mert95m.pt      # HF -> .pt

The source is checked against the model before anything is written; the output is written
atomically (an HF folder is built beside its target and swapped in whole).
"""

from __future__ import annotations

import argparse

from culturemert.checkpoint import convert
from culturemert.cli import command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("src", help="fairseq .pt file or HF folder (config.json + model.safetensors)")
    parser.add_argument("dst", help="HF folder (for a .pt source) or .pt file (for an HF source)")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle SRC without the allow-list (only for files from a source you trust)",
    )
    args = parser.parse_args(argv)
    print(convert(args.src, args.dst, args.trust_checkpoint))
    return 0


entry = command(main, "convert_checkpoint")
