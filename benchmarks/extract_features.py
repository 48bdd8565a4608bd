"""Feature extraction speed: ``MertModel.hidden_states`` vs transformers' ``HubertModel``.

Both hold the same randomly initialised MERT-v1-95M weights (converted through the HF format)
and return all 13 hidden states for batches of 5 s clips, in eval mode without gradients.
Prints the median clips per second of each and their ratio, on the CPU and on CUDA when present.

    python benchmarks/extract_features.py [--batch 4] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import HubertModel

from culturemert import load_model
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
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
    print(f"5 s clips, batch {args.batch}, {args.repeats} timed batches, {args.threads} CPU threads")
    print(f"{'device':<8}{'culturemert clips/s':>22}{'transformers clips/s':>22}{'ratio':>8}")
    for device in devices:
        ours.to(device)
        theirs.to(device)
        wav = torch.randn(args.batch, 120_000, device=device)
        speed = clips_per_second(
            {
                "culturemert": ours.hidden_states,
                "transformers": lambda w: theirs(w, output_hidden_states=True).hidden_states,
            },
            wav,
            args.repeats,
        )
        ours_speed, theirs_speed = speed["culturemert"], speed["transformers"]
        print(f"{device:<8}{ours_speed:>22.2f}{theirs_speed:>22.2f}{ours_speed / theirs_speed:>8.2f}")


if __name__ == "__main__":
    main()
