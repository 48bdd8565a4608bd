"""Token extraction throughput and cache size (scripts/extract_tokens.py; thesis 3.2).

Renders about a minute of real music (music21 fiddle tunes, 30 s rows like the pre-training
segments), builds a token cache from it on the CPU (and CUDA when present), and prints audio
seconds encoded per second of wall time, reading the audio included. The teacher is the
data-initialised EnCodec, which has the real codec's architecture and cost. Cache bytes per
audio hour are computed (75 frames/s x 8 codes x 2 bytes, plus 8 bytes of offset per row) and
measured on the cache written.

    python benchmarks/extract_tokens.py [--seconds 60] [--batch-seconds 120]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from culturemert.audio import FRAME_RATE, SAMPLE_RATE, load_audio
from culturemert.data.manifest import read_manifest, write_manifest
from culturemert.music_corpus import render_collection
from culturemert.targets.encodec_teacher import NUM_CODEBOOKS, EncodecTeacher
from culturemert.targets.token_cache import BATCH_SECONDS, build_token_cache

ROW_SECONDS = 30.0
HOUR = 3600.0


def render_rows(folder: Path, seconds: float) -> Path:
    """Render fiddle tunes of at most `ROW_SECONDS` each, list the first ones that add up to
    `seconds` of audio in a manifest, and return its path."""
    rendered = render_collection(
        "fiddle", folder, math.ceil(2 * seconds / ROW_SECONDS), seed=0, max_seconds=ROW_SECONDS
    )
    entries, total = [], 0
    for path, _ in rendered:
        if total >= seconds * SAMPLE_RATE:
            break
        entries.append((path.name, sf.info(path).frames))
        total += entries[-1][1]
    manifest = folder / "bench.tsv"
    write_manifest(manifest, folder, entries)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="audio to encode")
    parser.add_argument("--batch-seconds", type=float, default=BATCH_SECONDS, help="audio per teacher call")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        manifest = render_rows(folder / "audio", args.seconds)
        rows = read_manifest(manifest)
        audio = [load_audio(rows.audio_path(row)) for row in range(len(rows))]
        seconds = sum(len(clip) for clip in audio) / SAMPLE_RATE
        teacher = EncodecTeacher.from_data(torch.from_numpy(np.concatenate(audio))[None], seed=0)
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

        computed = FRAME_RATE * HOUR * NUM_CODEBOOKS * 2 + 8 * HOUR / ROW_SECONDS
        print(f"{len(audio)} rows, {seconds:.1f} s of audio; torch threads: {torch.get_num_threads()}")
        print(f"cache bytes per audio hour, computed: {computed / 1e6:.3f} MB")
        print(f"{'device':<8}{'wall s':>8}{'audio s / wall s':>18}{'measured MB / audio h':>24}")
        for device in devices:
            teacher.to(device)
            teacher.codes(torch.zeros(1, SAMPLE_RATE))  # warm-up: kernels, CUDA context
            out_dir = folder / f"tokens-{device}"
            start = time.perf_counter()
            build_token_cache(manifest, teacher, out_dir, args.batch_seconds, progress=False)
            if device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
            size = sum((out_dir / name).stat().st_size for name in ("codes.npy", "offsets.npy"))
            print(f"{device:<8}{wall:>8.1f}{seconds / wall:>18.1f}{size / seconds * HOUR / 1e6:>24.3f}")


if __name__ == "__main__":
    main()
