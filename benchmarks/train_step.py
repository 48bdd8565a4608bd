"""One pre-training update of MERT-v1-95M: time and peak memory of each training option.

A step is the full path of fairseq's training step for task ``mert_cpt``: teacher targets (CQT
always; EnCodec codes only on the fly), the noise mixture, forward + backward of the model with
the ``mert_mlm`` criterion, and the AdamW update. The options (issue 15):

- ``default``: float32 on the CPU; on CUDA FP16 autocast with float32 weights and a gradient
  scaler, as fairseq's ``common.amp``;
- ``checkpointing``: the same with ``model.checkpoint_activations=true``;
- ``bf16``: bfloat16 autocast (``task.bf16_autocast=true``), no scaler.

Each measurement runs in a fresh process, so that its peak RSS belongs to it alone; on CUDA
the peak allocated memory is reset after a warm-up step (which creates the Adam state). CPU:
batch 2 x 5 s; CUDA: batch 4 x 5 s (the thesis's per-step batch). The EnCodec teacher is the
data-initialised stand-in, which has the real codec's architecture and cost.

    python benchmarks/train_step.py [--steps 3] [--stage 2] [--options default,bf16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import torch

from culturemert.models.config import MertConfig

OPTIONS = ("default", "checkpointing", "bf16")
STAGE1_TRAINABLE = r"feature_extractor\..*,label_embs_concat"


@dataclass(frozen=True)
class Option:
    """A training option: the autocast dtype (None: float32) and activation checkpointing."""

    name: str
    autocast: torch.dtype | None
    checkpoint_activations: bool

    @property
    def precision(self) -> str:
        return {None: "FP32", torch.float16: "FP16", torch.bfloat16: "BF16"}[self.autocast]


def option(name: str, device: str) -> Option:
    """``name`` of `OPTIONS` on ``device``: the default is FP16 autocast on CUDA, FP32 on the CPU."""
    mixed = torch.float16 if device == "cuda" else None
    return {
        "default": Option("default", mixed, False),
        "checkpointing": Option("checkpointing", mixed, True),
        "bf16": Option("bf16", torch.bfloat16, False),
    }[name]


class TrainingStep:
    """Model, task, criterion and AdamW of one stage, stepped on random clips in one process."""

    def __init__(
        self,
        cfg: MertConfig,
        choice: Option,
        device: str,
        stage: int = 2,
        crop_samples: int = 120_000,
        on_the_fly_codes: bool = False,
    ):
        from culturemert.criterions.mert_mlm import MertMlmConfig, MertMlmCriterion
        from culturemert.models.mert import MertModel
        from culturemert.targets.encodec_teacher import EncodecTeacher
        from culturemert.tasks.mert_cpt import MertCptConfig, MertCptTask

        trainable = ".*" if stage == 2 else STAGE1_TRAINABLE
        task_cfg = MertCptConfig(data="unused", tokens="cached", trainable=trainable, seed=1)
        self.task = MertCptTask(task_cfg)
        model_cfg = replace(cfg, checkpoint_activations=choice.checkpoint_activations)
        self.model = self.task.freeze_for_stage(MertModel(model_cfg)).to(device).train()
        self.criterion = MertMlmCriterion(MertMlmConfig(), self.task)
        if on_the_fly_codes:
            calibration = torch.randn(1, 20 * 24_000) * 0.1  # from_data needs >= 1,024 distinct frames
            self.task.encodec = EncodecTeacher.from_data(calibration, seed=0).to(device)
        trainable_parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable_parameters, lr=1e-5)
        self.scaler = torch.amp.GradScaler(device, enabled=choice.autocast == torch.float16)
        self.choice, self.device, self.crop_samples = choice, device, crop_samples

    def __call__(self, batch: int) -> float:
        """One update on ``batch`` random clips; returns the loss."""
        device = self.device
        frames = self.crop_samples // 320 + 1
        sample = {"net_input": {"source": torch.randn(batch, self.crop_samples, device=device) * 0.1}}
        sample["net_input"]["padding_mask"] = None
        if self.task.encodec is None:
            sample["codes"] = torch.randint(0, 1024, (batch, frames, 8), device=device)
        sample = self.task.add_targets(sample, mix=True)
        dtype = self.choice.autocast
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _, _ = self.criterion(self.model, sample)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def measure(device: str, name: str, targets: str, stage: int, steps: int) -> dict:
    torch.manual_seed(0)
    batch = 4 if device == "cuda" else 2
    choice = option(name, device)
    step = TrainingStep(MertConfig(), choice, device, stage, on_the_fly_codes=targets == "on_the_fly")
    step(batch)  # warm-up: kernels, optimizer state
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    result = dict(device=device, batch=batch, option=name, precision=choice.precision, targets=targets)
    result["seconds"] = seconds
    if device == "cuda":
        result["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--stage", type=int, choices=(1, 2), default=2)
    parser.add_argument(
        "--options", default=",".join(OPTIONS), help=f"comma-separated of {', '.join(OPTIONS)}"
    )
    parser.add_argument("--one", nargs=3, metavar=("DEVICE", "OPTION", "TARGETS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.stage, args.steps)))
        return
    names = args.options.split(",")
    unknown = sorted(set(names) - set(OPTIONS))
    if unknown:
        parser.error(f"unknown options {', '.join(unknown)}; choose from {', '.join(OPTIONS)}")
    runs = [(name, "cached") for name in names] + [("default", "on_the_fly")] * ("default" in names)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"MERT-v1-95M, stage {args.stage} update (5 s crops), mean of {args.steps} steps after a warm-up")
    header = f"{'device':<7}{'batch':>6}{'option':>15}{'precision':>10}{'targets':>12}{'s/step':>9}"
    print(f"{header}{'peak RSS GiB':>14}{'peak CUDA GiB':>15}")
    for device in devices:
        for name, targets in runs:
            command = [sys.executable, __file__, "--steps", str(args.steps), "--stage", str(args.stage)]
            output = subprocess.run(
                [*command, "--one", device, name, targets], check=True, capture_output=True, text=True
            ).stdout
            r = json.loads(output.strip().splitlines()[-1])
            cuda = f"{r['peak_cuda_gib']:.2f}" if "peak_cuda_gib" in r else "-"
            print(
                f"{device:<7}{r['batch']:>6}{name:>15}{r['precision']:>10}{targets:>12}{r['seconds']:>9.2f}"
                f"{r['peak_rss_gib']:>14.2f}{cuda:>15}"
            )


if __name__ == "__main__":
    main()
