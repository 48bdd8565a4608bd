"""Feature extraction speed: ``MertModel.hidden_states`` vs transformers' ``HubertModel``.

Both hold the same randomly initialised MERT-v1-95M weights (converted through the HF format)
and return all 13 hidden states for batches of 30 s windows (the probing chunk), in eval mode
under ``torch.inference_mode``, in each precision of `culturemert.probing.precision` (float32;
on CUDA also bfloat16 and float16 autocast, both models alike). Prints the median clips per
second of each, their ratio, the largest difference between our hidden states and HubertModel's
float32 ones, the same for the mean-pooled states relative to their layer's largest value, and
the machine's load average, on the CPU and on CUDA when present.

    python benchmarks/extract_features.py [--batch 2] [--repeats 3] [--threads 1] [--seconds 30]
        [--devices cpu,cuda]
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
from culturemert.probing.precision import PRECISIONS, computation


def clips_per_second(
    forwards: dict, wav: torch.Tensor, repeats: int, precision: str = "float32"
) -> dict[str, float]:
    """Median clips/s of each forward in ``precision``; the timed batches alternate between the
    forwards so that a change in machine load affects them alike."""
    times = {name: [] for name in forwards}
    with computation(precision, wav.device):
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


def compare(
    ours: MertModel, theirs: HubertModel, wav: torch.Tensor, repeats: int, precision: str = "float32"
) -> dict[str, float]:
    """Clips/s of both models' 13 hidden states on ``wav`` in ``precision`` (`clips_per_second`),
    the largest difference between our states in ``precision`` and HubertModel's in float32
    (``max_difference``), and the largest difference of the mean-pooled states (the probe's
    features) relative to the largest pooled value of their layer (``pooled_relative``)."""

    def hubert(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return theirs(w, output_hidden_states=True).hidden_states

    forwards = {"culturemert": ours.hidden_states, "transformers": hubert}
    speed = clips_per_second(forwards, wav, repeats, precision)
    with computation("float32", wav.device):
        reference = [state.float() for state in hubert(wav)]
    with computation(precision, wav.device):
        mine = [state.float() for state in ours.hidden_states(wav)]
    difference = max((a - b).abs().max().item() for a, b in zip(mine, reference))
    pooled = [
        ((a.mean(dim=1) - b.mean(dim=1)).abs().max() / b.mean(dim=1).abs().max()).item()
        for a, b in zip(mine, reference)
    ]
    return {**speed, "max_difference": difference, "pooled_relative": max(pooled)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0, help="window length")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--devices", default="cpu,cuda", help="comma-separated; cuda is left out where there is none"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MertConfig()
    with tempfile.TemporaryDirectory() as tmp:
        save_fairseq(Path(tmp) / "model.pt", cfg, MertModel(cfg).state_dict())
        convert(Path(tmp) / "model.pt", Path(tmp) / "hf")
        ours = load_model(Path(tmp) / "model.pt")
        theirs = HubertModel.from_pretrained(Path(tmp) / "hf").eval()

    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    print(
        f"{args.seconds:g} s clips, batch {args.batch}, {args.repeats} timed batches, {args.threads} CPU "
        f"threads, load average {' '.join(f'{load:.2f}' for load in os.getloadavg())} before"
    )
    print(
        f"{'device':<7}{'precision':>10}{'culturemert clips/s':>21}{'transformers clips/s':>22}{'ratio':>7}"
        f"{'max diff':>10}{'pooled rel':>12}"
    )
    for device in devices:
        ours.to(device)
        theirs.to(device)
        wav = torch.randn(args.batch, round(args.seconds * SAMPLE_RATE), device=device)
        for precision in PRECISIONS if device == "cuda" else ["float32"]:
            r = compare(ours, theirs, wav, args.repeats, precision)
            mine, hubert = r["culturemert"], r["transformers"]
            print(
                f"{device:<7}{precision:>10}{mine:>21.3f}{hubert:>22.3f}{mine / hubert:>7.2f}"
                f"{r['max_difference']:>10.1e}{r['pooled_relative']:>12.1e}"
            )
    print(f"load average {' '.join(f'{load:.2f}' for load in os.getloadavg())} after")


if __name__ == "__main__":
    main()
