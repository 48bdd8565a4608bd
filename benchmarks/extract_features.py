"""Feature extraction speed: ``MertModel.hidden_states`` vs transformers' ``HubertModel``.

Both hold the same randomly initialised MERT-v1-95M weights (converted through the HF format)
and return all 13 hidden states for batches of 30 s windows (the probing chunk), in eval mode
under ``torch.inference_mode``. Prints the median clips per second of each, their ratio, the
largest difference between their hidden states and the machine's load average, on the CPU and
on CUDA when present.

    python benchmarks/extract_features.py [--batch 2] [--repeats 3] [--threads 1] [--seconds 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import HubertModel

from culturemert import load_model
from culturemert.audio import SAMPLE_RATE
from culturemert.checkpoint import convert, save_fairseq
from culturemert.models.mert import MertConfig, MertModel


def clips_per_second(forwards: dict, wav: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median clips/s of each forward; the timed batches alternate between the forwards so that
    a change in machine load affects them alike."""
    times = {name: [] for name in forwards}
    with torch.inference_mode():
        for forward in forwards.values():
            forward(wav)  # warm-up
        for _ in range(repeats):
            for name, forward in forwards.items():
                if wav.is_cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                forward(wav)
                if wav.is_cuda:
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    return {name: wav.shape[0] / statistics.median(seconds) for name, seconds in times.items()}


def compare(ours: MertModel, theirs: HubertModel, wav: torch.Tensor, repeats: int) -> dict[str, float]:
    """Clips/s of both models' 13 hidden states on ``wav`` (`clips_per_second`) and the largest
    difference between their hidden states (``max_difference``)."""
    speed = clips_per_second(
        {
            "culturemert": ours.hidden_states,
            "transformers": lambda w: theirs(w, output_hidden_states=True).hidden_states,
        },
        wav,
        repeats,
    )
    with torch.inference_mode():
        pairs = zip(ours.hidden_states(wav), theirs(wav, output_hidden_states=True).hidden_states)
        difference = max((a - b).abs().max().item() for a, b in pairs)
    return {**speed, "max_difference": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0, help="window length")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MertConfig()
    with tempfile.TemporaryDirectory() as tmp:
        save_fairseq(Path(tmp) / "model.pt", cfg, MertModel(cfg).state_dict())
        convert(Path(tmp) / "model.pt", Path(tmp) / "hf")
        ours = load_model(Path(tmp) / "model.pt")
        theirs = HubertModel.from_pretrained(Path(tmp) / "hf").eval()

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(
        f"{args.seconds:g} s clips, batch {args.batch}, {args.repeats} timed batches, {args.threads} CPU "
        f"threads, load average {' '.join(f'{load:.2f}' for load in os.getloadavg())} before"
    )
    print(f"{'device':<8}{'culturemert clips/s':>22}{'transformers clips/s':>22}{'ratio':>8}{'max diff':>10}")
    for device in devices:
        ours.to(device)
        theirs.to(device)
        wav = torch.randn(args.batch, round(args.seconds * SAMPLE_RATE), device=device)
        result = compare(ours, theirs, wav, args.repeats)
        difference = result["max_difference"]
        ours_speed, theirs_speed = result["culturemert"], result["transformers"]
        print(
            f"{device:<8}{ours_speed:>22.3f}{theirs_speed:>22.3f}{ours_speed / theirs_speed:>8.2f}"
            f"{difference:>10.1e}"
        )
    print(f"load average {' '.join(f'{load:.2f}' for load in os.getloadavg())} after")


if __name__ == "__main__":
    main()
