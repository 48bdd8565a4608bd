"""Merge culture-specialised MERT models in weight space (thesis 3.4, 4.4).

theta = theta_pre + sum_i lambda_i (theta_i - theta_pre), or its TIES / DARE variants.

python scripts/merge.py --base MERT-v1-95M_fairseq.pt --models makam.pt hindustani.pt carnatic.pt \\
    lyra.pt --out culturemert_ta --lambda 0.2 --similarity          # CultureMERT-TA
python scripts/merge.py --base ... --models ... --out sweep --sweep    # thesis grid, DIR/lambda_<v>/

Inputs are fairseq .pt files or HF folders, mixed. Each output folder holds checkpoint.pt (fairseq),
hf/ (transformers) and merge.json (how it was made). OUT is built beside itself and swapped in
whole when everything is written: an interrupted merge leaves the previous OUT as it was.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from culturemert.cli import command
from culturemert.files import replace_folder, writing
from culturemert.merging import (
    MERGE_FILES,
    METHODS,
    SWEEP_LAMBDAS,
    analyse,
    check_lambdas,
    merge,
    merge_record,
    method_named,
    open_source,
    plan_merge,
    write_merge_files,
    write_similarity,
)


def floats(text: str) -> list[float]:
    """argparse type: ``"0.1,0.2"`` -> ``[0.1, 0.2]`` (finiteness is checked by the merge)."""
    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="merge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
        choices=list(METHODS),
        default="task_arithmetic",
        help="ties: lambda scales the disjoint mean of the task vectors (the paper's lambda, about 1), "
        "not their sum",
    )
    parser.add_argument(
        "--density", type=float, default=0.2, help="TIES: fraction kept per task vector; DARE: keep rate"
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


def main(argv: list[str] | None = None) -> int:
    """Check the settings and inputs; then, in a folder beside OUT, read the task vectors (norms,
    similarity files) and write every lambda's merge; then swap that folder in as OUT."""
    args = parse_args(argv)
    start = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)

    method = method_named(args.method, args.density, args.seed)
    if args.sweep is not None:
        runs = [(f"lambda_{value!r}", [value] * len(args.models)) for value in args.sweep]
    else:
        runs = [("", args.lambdas or [args.shared] * len(args.models))]
    for _, lambdas in runs:  # checked before anything is read
        check_lambdas(lambdas, len(args.models))
    with writing(args.out):  # a second merge into OUT is refused before anything is read
        base = open_source(args.base, args.trust_checkpoint)
        models = [open_source(path, args.trust_checkpoint) for path in args.models]
        plan = plan_merge(base, models, args.backbone_only)
        say(f"{method.name}: {len(plan.merged)} tensors of {len(models)} models onto {base.path}")
        for note in plan.notes:
            say(f"note: {note}")

        def build(partial: Path) -> None:
            trim = method.sparsification.trim_density
            say("reading the task vectors: values, norms" + (", TIES trim thresholds" if trim else ""))
            stats = analyse(plan, trim)
            norms = ", ".join(
                f"{label} {norm:.4g}" for label, norm in zip(stats.labels, stats.norms.tolist())
            )
            say(f"task-vector norms: {norms}")
            if warning := stats.norm_warning():
                print(f"merge: warning: {warning}", file=sys.stderr)
            if args.similarity:
                csv_path, png_path = write_similarity(stats, partial)
                say(f"wrote {args.out / csv_path.name} and {args.out / png_path.name}")
            for name, lambdas in runs:
                state = merge(plan, lambdas, method, thresholds=stats.thresholds)
                write_merge_files(
                    partial / name, base.cfg, state, merge_record(plan, lambdas, method, args.seed)
                )
                del state  # freed before the next lambda's state is allocated
                folder = args.out / name
                say(f"lambdas {','.join(map(str, lambdas))}: wrote {folder}/checkpoint.pt and {folder}/hf/")

        replace_folder(args.out, build, MERGE_FILES)
        say(f"{args.out} is complete")
    return 0


entry = command(main, "merge")
