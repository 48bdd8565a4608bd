"""The musical teacher's speed: ``CQTTeacher`` (grouped kernels) against nnAudio's CQT forward.

Both compute the CQT magnitudes of the thesis (eq. 3.3) for a training batch of white noise, on
the CPU and on CUDA when present, timed alternately (`extract_features.clips_per_second`).
Prints, per crop length, the median seconds per batch of each,
their ratio and the largest difference relative to the largest magnitude, with the load average.

    python benchmarks/cqt_teacher.py [--batch 4] [--seconds 1,5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os

import torch
from extract_features import clips_per_second

from culturemert.audio import SAMPLE_RATE
from culturemert.targets.cqt import CQTSettings, CQTTeacher, nnaudio_cqt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seconds", default="1,5", help="comma-separated crop lengths")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(
        f"batch {args.batch}, torch threads {torch.get_num_threads()}, load average "
        f"{' '.join(f'{load:.1f}' for load in os.getloadavg())}"
    )
    print("device crop-s culturemert-s nnAudio-s ratio max-relative-difference")
    for device in devices:
        ours, reference = CQTTeacher().to(device), nnaudio_cqt(CQTSettings()).to(device)
        for crop in map(float, args.seconds.split(",")):
            wav = torch.randn(args.batch, int(crop * SAMPLE_RATE), device=device)
            with torch.no_grad():
                difference = (ours(wav) - reference(wav).transpose(1, 2)).abs().max()
                relative = (difference / reference(wav).abs().max()).item()
            speed = clips_per_second({"ours": ours, "nnAudio": reference}, wav, args.repeats)
            fast, slow = args.batch / speed["ours"], args.batch / speed["nnAudio"]
            print(f"{device} {crop:g} {fast:.3f} {slow:.3f} {slow / fast:.2f} {relative:.1e}")


if __name__ == "__main__":
    main()
