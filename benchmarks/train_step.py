"""One pre-training update of MERT-v1-95M: time and peak memory, cached vs on-the-fly codes.

Each measurement runs in a fresh process (so peak RSS belongs to it alone) and times the
full path of a training step: teacher targets (CQT always; EnCodec codes only on the fly),
the noise mixture, and forward + backward of the model with the ``mert_mlm`` criterion.
The EnCodec teacher is the data-initialised stand-in, which has the real codec's architecture
and cost. CPU: batch 2 x 5 s in FP32. CUDA (when present): batch 4 x 5 s in FP16 autocast,
reporting peak allocated CUDA memory.

    python benchmarks/train_step.py [--steps 3] [--stage 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def measure(device: str, targets: str, stage: int, steps: int) -> dict:
    from culturemert.criterions.mert_mlm import MertMlmConfig, MertMlmCriterion
    from culturemert.models.mert import MertConfig, MertModel
    from culturemert.targets.encodec_teacher import EncodecTeacher
    from culturemert.tasks.mert_cpt import MertCptConfig, MertCptTask

    torch.manual_seed(0)
    batch = 4 if device == "cuda" else 2
    trainable = ".*" if stage == 2 else r"feature_extractor\..*,label_embs_concat"
    task = MertCptTask(MertCptConfig(data="unused", tokens="cached", trainable=trainable, seed=1))
    model = task.freeze_for_stage(MertModel(MertConfig())).to(device).train()
    criterion = MertMlmCriterion(MertMlmConfig(), task)
    wav = torch.randn(batch, 120_000, device=device) * 0.1
    if targets == "on_the_fly":
        calibration = torch.randn(1, 20 * 24_000) * 0.1  # from_data needs >= 1,024 distinct frames
        task.encodec = EncodecTeacher.from_data(calibration, seed=0).to(device)
    codes = torch.randint(0, 1024, (batch, 375, 8), device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        sample = {"net_input": {"source": wav.clone(), "padding_mask": None}}
        if targets == "cached":
            sample["codes"] = codes
        sample = task.add_targets(sample, mix=True)
        with torch.autocast(device, dtype=torch.float16, enabled=device == "cuda"):
            loss, _, _ = criterion(model, sample)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: kernels, optimizer state
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    result = {"device": device, "batch": batch, "targets": targets, "stage": stage, "seconds": seconds}
    if device == "cuda":
        result["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--stage", type=int, choices=(1, 2), default=2)
    parser.add_argument("--one", nargs=2, metavar=("DEVICE", "TARGETS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.stage, args.steps)))
        return
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"MERT-v1-95M, stage {args.stage} update (5 s crops), mean of {args.steps} steps after a warm-up")
    print(f"{'device':<7}{'batch':>6}{'targets':>12}{'s/step':>9}{'peak RSS GiB':>14}{'peak CUDA GiB':>15}")
    for device in devices:
        for targets in ("cached", "on_the_fly"):
            command = [sys.executable, __file__, "--steps", str(args.steps), "--stage", str(args.stage)]
            output = subprocess.run(
                [*command, "--one", device, targets], check=True, capture_output=True, text=True
            ).stdout
            r = json.loads(output.strip().splitlines()[-1])
            cuda = f"{r['peak_cuda_gib']:.2f}" if "peak_cuda_gib" in r else "-"
            print(
                f"{device:<7}{r['batch']:>6}{targets:>12}{r['seconds']:>9.2f}{r['peak_rss_gib']:>14.2f}{cuda:>15}"
            )


if __name__ == "__main__":
    main()
