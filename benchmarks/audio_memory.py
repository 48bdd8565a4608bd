"""Peak memory of data preparation and of probe feature extraction against recording length
(culturemert/data/writing.py, thesis 3.1; culturemert/probing/features.py, thesis 3.5.2).

Generates 5 minutes and 1 hour of 44.1 kHz stereo 16-bit WAV (a chord and noise, written block
by block). Each is prepared as the only recording of a makam run (30 s segments at 24 kHz mono),
and its features extracted by a tiny random model (configs/model/tiny.yaml) in 30 s windows with
no duration cut, each in a fresh process; the benchmark prints that process's peak RSS, with the
peak of the same process after its imports only. Recordings are decoded in blocks
(`culturemert.audio.stream_audio`) and windows encoded as they are decoded, so each 1-hour
figure should stay within 1.2x of its 5-minute one (whose 10 windows fill the extraction's
batches of 8, as the hour's do). Then checks the written segments against decoding the whole file
at once (soundfile + one `soxr.resample` call): the first 5 minutes of each; the max abs
difference includes the 16-bit rounding of the written FLAC (half a step is 1.5e-5).

    python benchmarks/audio_memory.py [--folder /tmp/audio_memory] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from culturemert.audio import SAMPLE_RATE

SOURCE_RATE = 44_100
BLOCK_SECONDS = 60
COMPARED_SECONDS = 300
SEGMENT_SECONDS = 30

CHILD = """
import importlib, resource, sys
main = importlib.import_module(f"culturemert.cli.{sys.argv[1]}").main
imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[2:]:
    assert main(sys.argv[2:]) == 0
print(imports, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
TINY = Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml"


def generate(path: Path, seconds: int) -> None:
    """`seconds` of stereo audio at 44.1 kHz, written `BLOCK_SECONDS` at a time."""
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", SOURCE_RATE, 2, subtype="PCM_16") as handle:
        for start in range(0, seconds, BLOCK_SECONDS):
            t = (
                np.arange(start * SOURCE_RATE, min(seconds, start + BLOCK_SECONDS) * SOURCE_RATE)
                / SOURCE_RATE
            )
            chord = sum(0.15 * np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6))
            left = chord + 0.05 * rng.standard_normal(len(t))
            handle.write(np.stack([left, 0.8 * left], axis=1))


def peak_rss_mib(tool: str, *argv: str) -> tuple[float, float]:
    """(after imports, at the end) peak RSS in MiB of a fresh process running `tool` `argv`."""
    command = [sys.executable, "-c", CHILD, tool, *argv]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"audio_memory: {tool} failed:\n{result.stderr[-3000:]}")
    imports, peak = (int(value) / 1024 for value in result.stdout.split()[-2:])
    return imports, peak


def prepare(recording: Path, out: Path) -> tuple[float, float]:
    split = recording.with_suffix(".csv")
    split.write_text(f"{recording.name},train\n")
    hours = str(2 * SEGMENT_SECONDS / 3600 + 2)  # more than the recording: every segment is written
    return peak_rss_mib(
        "prepare_data", "--run", "makam", "--culture", f"makam={recording.parent}",
        "--split", f"makam={split}", "--replay-share", "0", "--stage1-hours", hours,
        "--stage2-hours", hours, "--out", str(out),
    )  # fmt: skip


def extract(recording: Path, model: Path, out: Path) -> tuple[float, float]:
    task = recording.with_name("task.csv")
    task.write_text(f"path,split,tags\n{recording.name},train,a\n")
    return peak_rss_mib(
        "probe", "extract", "--model", str(model), "--task", str(task), "--audio-root",
        str(recording.parent), "--out", str(out), "--no-progress",
    )  # fmt: skip


def max_difference(recording: Path, out: Path, seconds: int) -> float:
    """Max abs difference between the first `seconds` of written segments and decoding the whole
    first `seconds` (plus a second of context) at once."""
    frames = min(sf.info(recording).frames, (seconds + 1) * SOURCE_RATE)
    whole, _ = sf.read(recording, frames=frames, dtype="float32")
    reference = soxr.resample(whole.mean(axis=1), SOURCE_RATE, SAMPLE_RATE, quality="VHQ")
    manifest = json.loads((out / "makam" / "provenance.json").read_text())["audio_out"]
    audio = Path(manifest) / "makam"
    written = np.concatenate(
        [sf.read(audio / f"{recording.stem}_{index:04d}.flac", dtype="float32")[0]
         for index in range(seconds // SEGMENT_SECONDS)]
    )  # fmt: skip
    return float(np.abs(written - reference[: len(written)]).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--folder", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the generated audio and segments")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="audio_memory-"))
    try:
        for tool in ("prepare_data", "probe"):
            print(f"{tool}: peak RSS after imports only: {peak_rss_mib(tool)[0]:.0f} MiB")
        model = folder / "tiny.pt"
        peak_rss_mib("init_model", "--config", str(TINY), "--out", str(model))
        figures: dict[tuple[str, str], float] = {}
        for label, seconds in (("5 minutes", 300), ("1 hour", 3600)):
            name = label.replace(" ", "_")
            recording = folder / name / "recording.wav"
            recording.parent.mkdir(parents=True, exist_ok=True)
            generate(recording, seconds)
            out = folder / f"out_{name}"
            _, figures[("prepare_data", label)] = prepare(recording, out)
            compared = min(seconds, COMPARED_SECONDS)
            difference = max_difference(recording, out, compared)
            _, figures[("probe extract", label)] = extract(recording, model, folder / f"features_{name}")
            print(
                f"{label} of 44.1 kHz stereo ({recording.stat().st_size / 2**20:.0f} MiB WAV): peak RSS "
                f"prepare_data {figures[('prepare_data', label)]:.0f} MiB, probe extract "
                f"{figures[('probe extract', label)]:.0f} MiB; prepared, first {compared} s vs "
                f"whole-file decoding: max abs diff {difference:.2e}"
            )
        for tool in ("prepare_data", "probe extract"):
            ratio = figures[(tool, "1 hour")] / figures[(tool, "5 minutes")]
            within = "within" if ratio <= 1.2 else "above"
            print(f"{tool}: 1 hour / 5 minutes peak RSS {ratio:.2f}x ({within} 1.2x)")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
