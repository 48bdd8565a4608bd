"""Extract the EnCodec tokens of every clip of a manifest into a token cache (thesis 3.2).

python scripts/extract_tokens.py --manifest data/train.tsv --encodec weights/encodec_24khz-d7cc33bc.th \\
    --out data/tokens/train --device cuda
python scripts/extract_tokens.py --manifest data/train.tsv --from-data-seed 0 --out data/tokens/demo \\
    --save-teacher data/demo_teacher.th
python scripts/extract_tokens.py --manifest data/train.tsv --from-data-seed 0 --save-teacher data/t.th

--encodec is the published teacher MERT trains on. --from-data-seed builds an untrained EnCodec whose
codebooks are drawn from a seeded sample of the manifest's own audio (for tests and offline demos;
see culturemert.targets.encodec_teacher); without --out only that teacher is written. An
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from culturemert.audio import SAMPLE_RATE, AudioError, read_crop
from culturemert.cli import command
from culturemert.data.manifest import Manifest, read_manifest
from culturemert.targets.encodec_teacher import EncodecTeacher, TeacherError
from culturemert.targets.token_cache import BATCH_SECONDS, build_token_cache

CALIBRATION_SECONDS = 60.0
CALIBRATION_CROP_SECONDS = 10.0


def calibration_audio(manifest: Manifest, seed: int, skip_bad: bool) -> torch.Tensor:
    """[1, samples]: up to `CALIBRATION_SECONDS` of the manifest's audio, as crops of at most
    `CALIBRATION_CROP_SECONDS` from rows drawn with `seed`, joined end to end."""
    rng = np.random.default_rng(seed)
    wanted = round(CALIBRATION_SECONDS * SAMPLE_RATE)
    crops, total = [], 0
    for row in rng.permutation(len(manifest)).tolist():
        available = int(manifest.num_samples[row])
        length = min(round(CALIBRATION_CROP_SECONDS * SAMPLE_RATE), available, wanted - total)
        start = int(rng.integers(0, available - length + 1))
        try:
            crops.append(read_crop(manifest.audio_path(row), start, length))
        except AudioError:
            if not skip_bad:
                raise
            continue
        total += length
        if total == wanted:
            break
    if not crops:
        raise TeacherError(f"{manifest.path}: no readable audio to calibrate the teacher on")
    return torch.from_numpy(np.concatenate(crops))[None]


def device(name: str) -> torch.device:
    """argparse type of --device: a torch device that exists on this machine."""
    try:
        parsed = torch.device(name)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name}: CUDA is not available here; use cpu")
    return parsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="extract_tokens", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--manifest", required=True, help="fairseq manifest (.tsv) of 24 kHz mono clips")
    teacher_source = parser.add_mutually_exclusive_group(required=True)
    teacher_source.add_argument("--encodec", help="path of encodec_24khz-d7cc33bc.th")
    teacher_source.add_argument(
        "--from-data-seed", type=int, help="untrained EnCodec with codebooks drawn from the manifest's audio"
    )
    parser.add_argument(
        "--out", help="cache folder (codes.npy, offsets.npy, meta.json); without it, only --save-teacher"
    )
    parser.add_argument("--device", type=device, default="cpu", help="device running the teacher (cpu, cuda)")
    parser.add_argument(
        "--batch-seconds", type=float, default=BATCH_SECONDS, help="seconds of audio per teacher call"
    )
    parser.add_argument(
        "--skip-bad", action="store_true", help="give unusable audio files zero frames instead of stopping"
    )
    parser.add_argument(
        "--save-teacher",
        help="with --from-data-seed: also write the teacher as an EnCodec checkpoint, to pass as --encodec "
        "for the other manifests of a run so that all their codes come from the same teacher",
    )
    args = parser.parse_args(argv)
    if args.save_teacher and args.from_data_seed is None:
        parser.error("--save-teacher goes with --from-data-seed")
    if args.out is None and args.save_teacher is None:
        parser.error("--out is required, unless --save-teacher is all that is wanted")
    if args.encodec is not None:
        teacher = EncodecTeacher.from_checkpoint(args.encodec)
    else:
        manifest = read_manifest(args.manifest)
        calibration = calibration_audio(manifest, args.from_data_seed, args.skip_bad)
        teacher = EncodecTeacher.from_data(calibration, args.from_data_seed)
        if args.save_teacher:
            teacher.save(args.save_teacher)
            if args.out is None:
                print(args.save_teacher)
                return 0
    out_dir = build_token_cache(
        args.manifest, teacher.to(args.device), args.out, args.batch_seconds, skip_bad=args.skip_bad
    )
    print(out_dir)
    return 0


entry = command(main, "extract_tokens")
