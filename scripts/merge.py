"""Merge culture-specialised MERT models in weight space (thesis 3.4, 4.4; SPEC §4).

theta = theta_pre + sum_i lambda_i (theta_i - theta_pre), or its TIES / DARE variants.

python scripts/merge.py --base MERT-v1-95M_fairseq.pt --models makam.pt hindustani.pt carnatic.pt \\
    lyra.pt --out culturemert_ta --lambda 0.2 --similarity          # CultureMERT-TA
python scripts/merge.py --base ... --models ... --out sweep --sweep    # thesis grid, DIR/lambda_<v>/

Inputs are fairseq .pt files or HF folders, mixed. Each output folder holds checkpoint.pt (fairseq),
hf/ (transformers) and merge.json (how it was made).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from culturemert.checkpoint import CheckpointError
from culturemert.merging import (
    METHODS,
    SWEEP_LAMBDAS,
    analyse,
    merge,
    merge_record,
    open_source,
    plan_merge,
    write_merged,
    write_similarity,
)


def floats(text: str) -> list[float]:
    """argparse type: ``"0.1,0.2"`` -> ``[0.1, 0.2]``."""
    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def density(text: str) -> float:
    """argparse type: a fraction in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"density must be in (0, 1], got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="the pre-trained model theta_pre (.pt or HF folder)")
    parser.add_argument("--models", required=True, nargs="+", help="the adapted models theta_i")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument(
        "--lambda", dest="shared", metavar="LAMBDA", type=float, default=0.2, help="one lambda for all (0.2)"
    )
    weights.add_argument("--lambdas", type=floats, help="one lambda per model, comma-separated")
    weights.add_argument(
        "--sweep",
        type=floats,
        nargs="?",
        metavar="LAMBDAS",
        const=list(SWEEP_LAMBDAS),
        help="several shared lambdas, one output each in OUT/lambda_<value>/ "
        f"(no value: the thesis grid {','.join(map(str, SWEEP_LAMBDAS))})",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="task_arithmetic",
        help="ties: lambda scales the disjoint mean of the task vectors (the paper's lambda, about 1), "
        "not their sum",
    )
    parser.add_argument(
        "--density", type=density, default=0.2, help="TIES: fraction kept per task vector; DARE: keep rate"
    )
    parser.add_argument("--seed", type=int, default=0, help="DARE drops and freshly initialised heads")
    parser.add_argument(
        "--backbone-only",
        action="store_true",
        help="merge the backbone; copy the pre-training heads from the base (implied by HF inputs)",
    )
    parser.add_argument(
        "--similarity",
        action="store_true",
        help="write the task vectors' cosine similarity (model and per layer) to OUT as CSV and PNG",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle the .pt inputs without the allow-list (only for files from a source you trust)",
    )
    args = parser.parse_args(argv)
    if args.lambdas is not None and len(args.lambdas) != len(args.models):
        parser.error(f"--lambdas has {len(args.lambdas)} values for {len(args.models)} models")
    if args.similarity and len(args.models) < 2:
        parser.error("--similarity needs at least two models")
    return args


def run(args: argparse.Namespace) -> None:
    """Open and check the inputs, report the task vectors, then merge and write each output."""
    start = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)

    base = open_source(args.base, args.trust_checkpoint)
    models = [open_source(path, args.trust_checkpoint) for path in args.models]
    plan = plan_merge(base, models, args.backbone_only)
    say(f"{args.method}: {len(plan.merged)} tensors of {len(models)} models onto {base.path}")
    for note in plan.notes:
        say(f"note: {note}")

    say(
        "reading the task vectors: values, norms"
        + (", TIES trim thresholds" if args.method == "ties" else "")
    )
    stats = analyse(plan, args.density if args.method == "ties" else None)
    norms = ", ".join(f"{label} {norm:.4g}" for label, norm in zip(stats.labels, stats.norms.tolist()))
    say(f"task-vector norms: {norms}")
    if warning := stats.norm_warning():
        print(f"merge: warning: {warning}", file=sys.stderr)
    if args.similarity:
        csv_path, png_path = write_similarity(stats, args.out)
        say(f"wrote {csv_path} and {png_path}")

    if args.sweep is not None:
        runs = [(args.out / f"lambda_{value!r}", [value] * len(models)) for value in args.sweep]
    else:
        runs = [(args.out, args.lambdas or [args.shared] * len(models))]
    for folder, lambdas in runs:
        state = merge(plan, lambdas, args.method, args.density, args.seed, stats.thresholds)
        record = merge_record(plan, lambdas, args.method, args.density, args.seed)
        write_merged(folder, base.cfg, state, record)
        del state  # freed before the next lambda's state is allocated
        say(f"lambdas {','.join(map(str, lambdas))}: wrote {folder}/checkpoint.pt and {folder}/hf/")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # fairseq configures the root logger at DEBUG on import; keep third-party chatter out.
    logging.getLogger().setLevel(logging.WARNING)
    try:
        run(args)
    except (CheckpointError, ValueError) as error:
        print(f"merge: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
