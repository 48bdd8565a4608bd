"""GPU readiness: the real training path on one GPU, the memory options, and extraction speed.

Where CUDA exists, from nothing but this repository:

1. a start checkpoint of MERT-v1-95M from random weights in the layout of the published
   ``MERT-v1-95M_fairseq.pt`` (``culturemert.testing.write_release_checkpoint``);
2. generated music (harmonic notes with decaying envelopes, 6 s clips, one epoch's worth so that
   no epoch boundary falls inside a stage), its manifests, and token caches from a
   data-initialised EnCodec stand-in (``scripts/extract_tokens.py --save-teacher``); both stages
   use the same clips;
3. stage 1 and stage 2 through ``bash scripts/run_cpt.sh`` (real ``fairseq-hydra-train`` with the
   stage configs' mixed precision, 4 x 5 s per step, update_freq 8, 12 updates each): per stage,
   updates/s and audio seconds/s between the first and the last logged update, peak CUDA memory
   (the task's ``cuda_peak_gib``) and whether every logged loss was finite;
4. the training options in-process (``benchmarks/train_step.py``'s step, stage 2, 4 x 5 s):
   default FP16 autocast, FP16 + activation checkpointing, bf16: peak CUDA memory, updates/s at
   update_freq 8, and the largest per-step batch of 5 s clips whose step stays within 12 GiB of
   allocated memory less 1 GiB for the CUDA context and the allocator's cache (doubling, then
   bisection, an out-of-memory error counting as not fitting);
5. feature extraction clips/s of the trained model against transformers' ``HubertModel`` on the
   same weights, 4 x 30 s windows, in float32 and both 16-bit autocasts
   (``benchmarks/extract_features.py``), with the largest differences from HubertModel's float32
   hidden states and mean-pooled features.

``--cpu-tiny`` runs the same steps on the CPU at test size (the tiny model of
``configs/model/tiny.yaml``, ``PRESET=tiny``: 1 s crops, 2 updates per stage; peak RSS instead of
CUDA memory, a 0.5 GiB budget; extraction of 1 s clips in float32). Each section prints its table
as soon as it is done, or one line saying why it failed, and the others still run. Exit status 1
when a section failed or a stage logged a non-finite loss.

    python benchmarks/gpu_check.py [--work DIR] [--updates 12]
    python benchmarks/gpu_check.py --cpu-tiny
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import yaml
from extract_features import compare
from train_step import OPTIONS, TrainingStep, option
from transformers import HubertModel

from culturemert import load_model
from culturemert.audio import SAMPLE_RATE
from culturemert.checkpoint import convert
from culturemert.data.manifest import write_manifest
from culturemert.models.config import MertConfig
from culturemert.probing.precision import PRECISIONS
from culturemert.testing import write_release_checkpoint

REPO = Path(__file__).resolve().parents[1]
RUN = "makam"  # any run of configs/cpt/: its max_update is overridden
GIB = 2**30


@dataclass(frozen=True)
class Settings:
    """What one check runs: the full-size GPU check or its CPU miniature."""

    device: str
    model: MertConfig
    preset: str | None  # PRESET of run_cpt.sh
    clips_per_step: int
    update_freq: int
    crop_samples: int
    clip_seconds: float
    valid_clips: int
    budget_gib: float  # memory a per-step batch may use
    max_batch: int  # the search stops here
    extract_batch: int
    extract_samples: int
    extract_repeats: int


def settings(cpu_tiny: bool) -> Settings:
    if cpu_tiny:
        tiny = yaml.safe_load((REPO / "configs" / "model" / "tiny.yaml").read_text())
        return Settings("cpu", MertConfig(**tiny), "tiny", 2, 1, 24_000, 5.0, 2, 0.5, 16, 2, 24_000, 2)
    return Settings("cuda", MertConfig(), None, 4, 8, 120_000, 6.0, 8, 12.0 - 1.0, 512, 4, 720_000, 5)


def synthetic_music(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Mono float32 audio at 24 kHz: overlapping notes of a pentatonic scale, each with 5
    harmonics and an exponential decay, at a random tempo; peak about 0.5."""
    samples = round(seconds * SAMPLE_RATE)
    audio = np.zeros(samples, np.float32)
    scale = 110.0 * 2.0 ** (np.array([0, 2, 4, 7, 9]) / 12)
    beat = 60.0 / rng.uniform(70, 160)
    for start in np.arange(0.0, seconds, beat / 2):
        if rng.random() < 0.3:
            continue
        f0 = scale[rng.integers(len(scale))] * 2 ** rng.integers(0, 3)
        length = min(round(rng.uniform(0.5, 2.0) * beat * SAMPLE_RATE), samples - round(start * SAMPLE_RATE))
        t = np.arange(length) / SAMPLE_RATE
        harmonics = sum(np.sin(2 * np.pi * f0 * h * t) / h**1.5 for h in range(1, 6))
        offset = round(start * SAMPLE_RATE)
        audio[offset : offset + length] += (0.2 * harmonics * np.exp(-t / (0.4 * beat))).astype(np.float32)
    return (0.5 * audio / max(np.abs(audio).max(), 1e-6)).astype(np.float32)


def run(command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run ``command`` with its output appended to ``log``; a failure raises with the log's last
    lines."""
    with open(log, "a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if result.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(
            f"{' '.join(command[:3])} ... failed (exit {result.returncode}); end of {log}:\n{tail}"
        )


def prepare_data(work: Path, s: Settings, updates: int, log: Path) -> None:
    """Clips, manifests of both stages (the same clips) and their token caches."""
    rng = np.random.default_rng(0)
    train = updates * s.clips_per_step * s.update_freq
    entries = {"train": [], "valid": []}
    for index in range(train + s.valid_clips):
        audio = synthetic_music(s.clip_seconds, rng)
        name = f"clip{index:04d}.wav"
        sf.write(work / "audio" / name, audio, SAMPLE_RATE, subtype="PCM_16")
        entries["train" if index < train else "valid"].append((name, len(audio)))
    for stage in (1, 2):
        for split, rows in entries.items():
            write_manifest(work / "manifests" / f"stage{stage}" / f"{split}.tsv", work / "audio", rows)
    script = [sys.executable, str(REPO / "scripts" / "extract_tokens.py"), "--device", s.device]
    teacher = work / "teacher.th"
    for split in ("train", "valid"):
        manifest, cache = work / "manifests" / "stage1" / f"{split}.tsv", work / "tokens" / "stage1" / split
        source = (
            ["--encodec", str(teacher)]
            if teacher.exists()
            else ["--from-data-seed", "0", "--save-teacher", str(teacher)]
        )
        run([*script, "--manifest", str(manifest), "--out", str(cache), *source], log)
        shutil.copytree(cache, work / "tokens" / "stage2" / split)  # same manifest bytes, same codes


LINE = re.compile(r"^\[([-0-9 :,]+)\]\[(train_inner|train|valid)\]\[INFO\] - (.*)$")
FIELD = re.compile(r"(?<![\w.])([a-z_][a-z_0-9]*)[= ](-?[0-9.]+(?:e[-+]?[0-9]+)?|nan|-?inf)(?=,|\s*\||\s*$)")


def parse_log(path: Path) -> dict:
    """Figures of one stage from fairseq's log (``hydra_train.log``): the per-update lines
    (``train_inner``) and their millisecond time stamps give the update rate (fairseq's own
    ``wall`` has whole seconds); every loss of train, train_inner and valid lines is checked."""
    updates, losses = [], []
    text = path.read_text()
    for line in text.splitlines():
        match = LINE.match(line)
        if match is None:
            continue
        fields = {key: float(value) for key, value in FIELD.findall(match[3])}
        losses += [value for key, value in fields.items() if key == "loss" or key.startswith("loss_")]
        if match[2] == "train_inner" and "num_updates" in fields:
            fields["time"] = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            updates.append(fields)
    result = {"logged_updates": len(updates), "finite": bool(losses) and all(map(math.isfinite, losses))}
    result["precision"] = precision(text)
    result["updates_per_s"] = result["clips_per_update"] = None
    if len(updates) >= 2:
        first, last = updates[0], updates[-1]
        rate = (last["num_updates"] - first["num_updates"]) / max(last["time"] - first["time"], 1e-9)
        result["updates_per_s"] = rate
        result["clips_per_update"] = last.get("bsz")
    peaks = [u["cuda_peak_gib"] for u in updates if "cuda_peak_gib" in u]
    result["peak_cuda_gib"] = max(peaks) if peaks else None
    return result


def precision(log: str) -> str:
    """How fairseq trained, from the configuration it logs first: 'fp16' (half weights, FP32
    master copy), 'amp' (FP16 autocast), 'bf16-autocast' (task.bf16_autocast) or 'fp32'."""
    flags = {
        name: re.search(rf"'{key}': True", log) is not None
        for name, key in (("fp16", "fp16"), ("amp", "amp"), ("bf16-autocast", "bf16_autocast"))
    }
    return next((name for name, on in flags.items() if on), "fp32")


def train_stages(work: Path, s: Settings, updates: int, log: Path) -> tuple[list[dict], Path]:
    """Both stages through ``scripts/run_cpt.sh``; their figures and the exported HF folder."""
    env = {
        **os.environ,
        "INIT": str(work / "init.pt"),
        "MANIFESTS": str(work / "manifests"),
        "TOKENS": str(work / "tokens"),
        "ENCODEC": str(work / "teacher.th"),
        "CPT_OUT": str(work / "runs"),
        "NAME": "gpu_check",
        **({"PRESET": s.preset} if s.preset else {}),
    }
    overrides = [
        f"optimization.max_update={updates}",
        f"dataset.batch_size={s.clips_per_step}",
        f"optimization.update_freq=[{s.update_freq}]",
        "common.log_interval=1",
        f"checkpoint.save_interval_updates={updates}",
        f"dataset.validate_interval_updates={updates}",
    ]
    run(["bash", str(REPO / "scripts" / "run_cpt.sh"), RUN, *overrides], log, env)
    out = work / "runs" / "gpu_check"
    stages = []
    for stage in (1, 2):
        figures = parse_log(out / f"stage{stage}" / "hydra" / "hydra_train.log")
        figures["stage"] = stage
        stages.append(figures)
    return stages, out / "hf"


def memory_probe(device: str):
    """(reset, peak) for the peak memory of what runs between them: CUDA's allocated bytes, or on
    the CPU the process's peak resident set (Linux: /proc/self/clear_refs resets it) less its
    resident set when the probe was made, before the model existed."""
    if device == "cuda":

        def reset() -> None:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

        def peak() -> float:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()

        return reset, peak

    def status(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1]) * 1024
        raise OSError(f"/proc/self/status has no {key}")

    gc.collect()
    baseline = status("VmRSS")

    def reset() -> None:
        Path("/proc/self/clear_refs").write_text("5")

    return reset, lambda: status("VmHWM") - baseline


def measure_option(name: str, s: Settings, steps: int = 3) -> dict:
    """Peak memory and speed of ``steps`` stage-2 steps of the thesis's per-step batch, then the
    largest batch within the budget."""
    torch.manual_seed(0)
    reset, peak = memory_probe(s.device)
    step = TrainingStep(s.model, option(name, s.device), s.device, 2, s.crop_samples)
    step(1)  # kernels and the Adam state, which every later step keeps
    reset()
    start = time.perf_counter()
    for _ in range(steps):
        step(s.clips_per_step)
    peak_bytes = peak()
    seconds = (time.perf_counter() - start) / steps

    def fits(batch: int) -> bool:
        try:
            reset()
            step(batch)
            return peak() <= s.budget_gib * GIB
        except torch.OutOfMemoryError:
            return False
        finally:
            step.optimizer.zero_grad(set_to_none=True)  # an out-of-memory error can stop mid-backward
            gc.collect()
            if s.device == "cuda":
                torch.cuda.empty_cache()

    fitting, failing = 0, None
    batch = s.clips_per_step
    while batch <= s.max_batch and fits(batch):
        fitting, batch = batch, batch * 2
    failing = batch if batch <= s.max_batch else None
    while failing is not None and failing - fitting > 1:
        middle = (fitting + failing) // 2
        fitting, failing = (middle, failing) if fits(middle) else (fitting, middle)
    return {
        "option": name,
        "precision": step.choice.precision,
        "peak_gib": peak_bytes / GIB,
        "updates_per_s": 1.0 / (seconds * s.update_freq),
        "largest_batch": fitting,
        "capped": failing is None,
    }


def extraction(hf: Path, s: Settings) -> list[dict]:
    """Clips/s of MertModel.hidden_states and HubertModel on the exported folder's weights, per
    precision (float32 only on the CPU)."""
    ours = load_model(hf).to(s.device)
    theirs = HubertModel.from_pretrained(hf).eval().to(s.device)
    wav = torch.randn(s.extract_batch, s.extract_samples, device=s.device) * 0.1
    precisions = PRECISIONS if s.device == "cuda" else ["float32"]
    return [{"precision": p, **compare(ours, theirs, wav, s.extract_repeats, p)} for p in precisions]


def stages_table(s: Settings, updates: int, stages: list[dict]) -> str:
    crop = s.crop_samples / SAMPLE_RATE
    per_step = f"{s.clips_per_step} x {crop:g} s per step"
    lines = [f"stages through scripts/run_cpt.sh ({updates} updates each, {per_step})"]
    lines.append(
        f"{'stage':<8}{'updates/s':>11}{'audio s/s':>11}{'peak CUDA GiB':>15}{'losses':>11}  precision"
    )
    for stage in stages:
        rate, clips = stage["updates_per_s"], stage["clips_per_update"]
        audio = rate * clips * crop if rate is not None and clips is not None else None
        cuda = stage["peak_cuda_gib"]
        lines.append(
            f"{'stage ' + str(stage['stage']):<8}{_number(rate, 3):>11}{_number(audio, 1):>11}"
            f"{_number(cuda, 2):>15}{'finite' if stage['finite'] else 'NOT-FINITE':>11}  {stage['precision']}"
        )
    return "\n".join(lines)


def options_table(s: Settings, options: list[dict]) -> str:
    crop = s.crop_samples / SAMPLE_RATE
    memory = "peak CUDA GiB" if s.device == "cuda" else "peak RSS+ GiB"
    lines = [f"training options (stage 2 step, {s.clips_per_step} x {crop:g} s; budget {s.budget_gib:g} GiB)"]
    lines.append(f"{'option':<15}{'precision':>10}{memory:>15}{'updates/s':>11}{'largest batch':>15}")
    for o in options:
        largest = f"{'>=' if o['capped'] else ''}{o['largest_batch']}"
        lines.append(
            f"{o['option']:<15}{o['precision']:>10}{o['peak_gib']:>15.2f}{o['updates_per_s']:>11.3f}{largest:>15}"
        )
    return "\n".join(lines)


def extraction_table(s: Settings, extract: list[dict]) -> str:
    window = s.extract_samples / SAMPLE_RATE
    lines = [f"feature extraction ({s.extract_batch} x {window:g} s clips, all hidden states)"]
    lines.append(
        f"{'precision':<10}{'culturemert clips/s':>21}{'transformers clips/s':>22}{'ratio':>8}"
        f"{'max diff':>10}{'pooled rel':>12}"
    )
    for e in extract:
        ours, theirs = e["culturemert"], e["transformers"]
        lines.append(
            f"{e['precision']:<10}{ours:>21.2f}{theirs:>22.2f}{ours / theirs:>8.2f}"
            f"{e['max_difference']:>10.1e}{e['pooled_relative']:>12.1e}"
        )
    return "\n".join(lines)


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--cpu-tiny", action="store_true", help="the test-size version on the CPU")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--updates", type=int, help="updates per stage (default: 12; --cpu-tiny: 2)")
    args = parser.parse_args(argv)
    s = settings(args.cpu_tiny)
    updates = args.updates or (2 if args.cpu_tiny else 12)
    if s.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; --cpu-tiny runs the CPU version")
    device = torch.cuda.get_device_name(0) if s.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {device}; load average {os.getloadavg()[0]:.1f}", flush=True)
    failed = False

    def section(name: str, work: Callable[[], str]) -> None:
        """Print the table ``work`` makes, or one line saying why it failed; the other sections run
        either way, so one failure on a rented GPU does not lose the other figures."""
        nonlocal failed
        start = time.perf_counter()
        try:
            table = work()
        except Exception as error:  # reported, and the exit status says so
            failed = True
            first_line = (str(error).splitlines() or [""])[0]
            table = f"{name} FAILED: {type(error).__name__}: {first_line}"
            traceback.print_exc()
        print(f"{table}\n({name}: {time.perf_counter() - start:.0f} s)\n", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for folder in ("audio", "manifests/stage1", "manifests/stage2", "tokens/stage1", "tokens/stage2"):
            (work / folder).mkdir(parents=True, exist_ok=True)
        log = work / "gpu_check.log"
        write_release_checkpoint(work / "init.pt", s.model, seed=0, optimizer_state=False)
        hf = work / "init_hf"  # the extraction's weights where training fails

        def training() -> str:
            nonlocal hf
            prepare_data(work, s, updates, log)
            stages, hf = train_stages(work, s, updates, log)
            if not all(stage["finite"] for stage in stages):
                nonlocal failed
                failed = True
            return stages_table(s, updates, stages)

        section("training", training)
        section("options", lambda: options_table(s, [measure_option(name, s) for name in OPTIONS]))
        if not hf.exists():
            convert(work / "init.pt", hf)
        section("extraction", lambda: extraction_table(s, extraction(hf, s)))
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
