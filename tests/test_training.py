"""Real fairseq training on real (rendered) music: the objective learns, the LR schedule follows
the formula, a release-layout start checkpoint runs through both stages, stage 1 freezes the
transformer, run_cpt.sh resumes after a kill, and two processes with layerdrop stay in step."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from culturemert.audio import audio_info, read_crop
from culturemert.checkpoint import read_checkpoint
from culturemert.data.manifest import write_manifest
from culturemert.lr_scheduler import cpt_cosine_lr
from culturemert.models.config import MertConfig
from culturemert.music_corpus import render_collection
from culturemert.targets.encodec_teacher import EncodecTeacher
from culturemert.targets.token_cache import build_token_cache
from culturemert.testing import write_release_checkpoint

REPO = Path(__file__).resolve().parents[1]
STAGE1_TRAINABLE = ("feature_extractor.", "label_embs_concat")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Rendered fiddle tunes (6 train, 2 valid clips of 4 s) as the manifests of both stages,
    with token caches from one data-initialised EnCodec teacher, and a tiny random model twice:
    init.pt as this project writes it, release.pt in the layout of the published checkpoint."""
    root = tmp_path_factory.mktemp("cpt")
    rendered = render_collection("fiddle", root / "audio", 8, seed=0, max_seconds=4)
    entries = [(path.name, audio_info(path)[0]) for path, _ in rendered]
    stage1 = root / "manifests" / "stage1"
    write_manifest(stage1 / "train.tsv", root / "audio", entries[:6])
    write_manifest(stage1 / "valid.tsv", root / "audio", entries[6:])
    calibration = torch.from_numpy(np.concatenate([read_crop(p, 0, 72_000) for p, _ in rendered[:6]]))
    teacher = EncodecTeacher.from_data(calibration[None], seed=0)
    for split in ("train", "valid"):
        build_token_cache(
            stage1 / f"{split}.tsv", teacher, root / "manifests/tokens/stage1" / split, progress=False
        )
    # Stage 2 uses the same clips here: identical manifests, so the caches stay valid copies.
    shutil.copytree(stage1, root / "manifests" / "stage2")
    shutil.copytree(root / "manifests/tokens/stage1", root / "manifests/tokens/stage2")
    init_model = [sys.executable, str(REPO / "scripts/init_model.py")]
    tiny = REPO / "configs/model/tiny.yaml"
    subprocess.run(
        [*init_model, "--config", str(tiny), "--out", str(root / "init.pt")], check=True, capture_output=True
    )
    write_release_checkpoint(root / "release.pt", MertConfig(**yaml.safe_load(tiny.read_text())))
    return root


def training_log(log_file: Path) -> list[dict]:
    """The per-update records fairseq writes with common.log_format=json."""
    records = []
    for line in log_file.read_text().splitlines():
        if "][train_inner][" in line:
            records.append(json.loads(line.split(" - ", 1)[1]))
    return records


def stage2_command(corpus: Path, save_dir: Path, *overrides: str, program: str | None = None) -> list[str]:
    """fairseq-hydra-train arguments of a tiny stage-2 run on the corpus, from its init model
    (configs/model/tiny.yaml, so +model=tiny gives its architecture)."""
    return [
        program or shutil.which("fairseq-hydra-train"), "--config-dir", str(REPO / "configs"),
        "--config-name", "stage", "+stage=stage2", "+preset=tiny", "+cpt=makam_stage2", "+model=tiny",
        f"common.user_dir={REPO / 'culturemert'}",
        f"task.data={corpus / 'manifests/stage2'}", f"+task.tokens={corpus / 'manifests/tokens/stage2'}",
        f"checkpoint.save_dir={save_dir}", f"checkpoint.finetune_from_model={corpus / 'init.pt'}",
        f"hydra.run.dir={save_dir}", "hydra.job.chdir=false", "common.log_format=json", *overrides,
    ]  # fmt: skip


def test_hydra_train_on_real_music_learns_and_follows_the_lr_formula(corpus, tmp_path):
    save_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    command = stage2_command(
        corpus, save_dir, "common.wandb_project=culturemert-test", "optimization.max_update=30",
        "optimization.lr=[2e-3]", "lr_scheduler.warmup_ratio=0.2", "lr_scheduler.min_lr=1e-4",
        "dataset.validate_interval_updates=30",
    )  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, env=env, cwd=tmp_path)
    records = training_log(save_dir / "hydra_train.log")
    assert [int(r["num_updates"]) for r in records] == list(range(1, 31))

    losses = np.array([float(r["loss"]) for r in records])
    assert losses[-8:].mean() < 0.9 * losses[:8].mean(), losses

    for t in (1, 3, 6, 18, 30):  # warm-up start, middle and end, mid-decay, final step
        logged = float(records[t - 1]["lr"])
        assert logged == pytest.approx(cpt_cosine_lr(t, 2e-3, 1e-4, warmup=6, end=30), rel=1e-5)

    assert any((tmp_path / "wandb").glob("offline-run-*")), "common.wandb_project logged nothing"


def run_cpt(corpus: Path, out: Path, timeout: float | None = None, kill_in_stage2: bool = False):
    """PRESET=tiny run_cpt.sh of the makam run (12 updates per stage) from the release layout."""
    env = {
        **os.environ,
        "PRESET": "tiny",
        "INIT": str(corpus / "release.pt"),
        "MANIFESTS": str(corpus / "manifests"),
        "CPT_OUT": str(out),
    }
    process = subprocess.Popen(
        ["bash", str(REPO / "scripts/run_cpt.sh"), "makam", "optimization.max_update=12"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    if kill_in_stage2:
        checkpoint = out / "makam" / "stage2" / "checkpoint_last.pt"
        while not checkpoint.exists():
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return None
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def final_updates(checkpoint: Path) -> int:
    return read_checkpoint(checkpoint)["optimizer_history"][-1]["num_updates"]


def test_run_cpt_from_the_release_layout_freezes_in_stage1_trains_all_in_stage2_and_resumes(corpus, tmp_path):
    output = run_cpt(corpus, tmp_path / "full")
    run = tmp_path / "full" / "makam"
    assert "final model (HF folder)" in output
    assert "dropped derived buffers (the task recomputes them): encoder_cqt_model.spec_layer." in output

    released = read_checkpoint(corpus / "release.pt")["model"]
    start = {name: value for name, value in released.items() if ".spec_layer." not in name}
    assert len(start) == len(released) - 3
    stage1 = read_checkpoint(run / "stage1" / "checkpoint_last.pt")["model"]
    stage2 = read_checkpoint(run / "stage2" / "checkpoint_last.pt")["model"]
    assert set(start) == set(stage1) == set(stage2)
    for name in start:
        if name.startswith(STAGE1_TRAINABLE):
            assert not torch.equal(stage1[name], start[name]), f"stage 1 did not train {name}"
        else:
            assert torch.equal(stage1[name], start[name]), f"stage 1 changed frozen {name}"
    transformer = [name for name in start if name.startswith("encoder.layers.")]
    assert all(not torch.equal(stage2[name], stage1[name]) for name in transformer)
    assert final_updates(run / "stage1" / "checkpoint_last.pt") == 12
    # Frozen parameters get no optimizer state: Adam's moments exist for the trainable ones only.
    optimizer_state = read_checkpoint(run / "stage1" / "checkpoint_last.pt")["last_optimizer_state"]["state"]
    assert len(optimizer_state) == sum(name.startswith(STAGE1_TRAINABLE) for name in start)
    assert final_updates(run / "stage2" / "checkpoint_last.pt") == 12

    from transformers import HubertModel

    HubertModel.from_pretrained(run / "hf")

    # Killed during stage 2 and rerun: stage 1 (finished, taken from the run above with the
    # run's fingerprint and start checkpoint) is skipped and stage 2 resumes from its
    # checkpoint_last.pt to the same final update.
    killed = tmp_path / "killed" / "makam"
    shutil.copytree(run / "stage1", killed / "stage1")
    for name in ("fingerprint.json", "init.pt"):
        shutil.copy(run / name, killed / name)
    run_cpt(corpus, tmp_path / "killed", kill_in_stage2=True)
    assert (killed / "stage1" / "finished").exists() and not (killed / "stage2" / "finished").exists()
    interrupted_at = final_updates(killed / "stage2" / "checkpoint_last.pt")
    assert interrupted_at < 12
    output = run_cpt(corpus, tmp_path / "killed")
    assert "stage 1 already finished" in output
    assert final_updates(killed / "stage2" / "checkpoint_last.pt") == 12
    assert (killed / "hf" / "model.safetensors").exists()


# fairseq saves on rank 0 only; this entry point lets every rank save, into its own folder, and
# counts the transformer layers each rank ran and skipped (layerdrop) in training forwards.
EVERY_RANK_SAVES = """
import atexit, json, os, sys
from culturemert.models import mert
from fairseq.trainer import Trainer
from fairseq_cli.hydra_train import cli_main

counts = {"layers": 0, "ran": 0}
encoder_forward, layer_forward = mert.TransformerEncoder.forward, mert.TransformerLayer.forward

def encoder(self, *args, **kwargs):
    counts["layers"] += self.training * len(self.layers)
    return encoder_forward(self, *args, **kwargs)

def layer(self, *args, **kwargs):
    counts["ran"] += self.training
    return layer_forward(self, *args, **kwargs)

mert.TransformerEncoder.forward, mert.TransformerLayer.forward = encoder, layer
atexit.register(lambda: open(f"layers_run{os.environ['RANK']}.json", "w").write(json.dumps(counts)))
Trainer.should_save_checkpoint_on_current_rank = property(lambda self: True)
sys.exit(cli_main())
"""


def test_two_process_data_parallel_run_with_layerdrop_keeps_the_ranks_identical(corpus, tmp_path):
    """fairseq's own distributed training, two torchrun processes over gloo (+launch=torchrun_cpu),
    with the default encoder_layerdrop 0.05 of the tiny model: the parameters of skipped layers
    get zero gradients from no_c10d's all-reduce instead of stopping DDP, and after 10 updates
    both ranks hold the same weights."""
    program = tmp_path / "every_rank_saves.py"
    program.write_text(EVERY_RANK_SAVES)
    for rank in (0, 1):
        (tmp_path / f"rank{rank}").mkdir()
    save_dir = str(tmp_path / "rank${oc.env:RANK}")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command = [*torchrun, "--master_port", "29617"] + stage2_command(
        corpus, save_dir, "+launch=torchrun_cpu", "optimization.max_update=10", program=str(program)
    )
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "rank0" / "hydra_train.log").read_text()
    assert "distributed init (rank 1)" in (tmp_path / "rank1" / "hydra_train.log").read_text()
    assert "'encoder_layerdrop': 0.05" in log
    # 6 training clips in batches of 2: one process takes 3 batches per epoch, each of two ranks 2.
    epochs = [
        json.loads(line.split(" - ", 1)[1])["epoch"] for line in log.splitlines() if "][train_inner][" in line
    ]
    assert epochs[:2] == [1, 1] and 2 in epochs
    ranks = [read_checkpoint(tmp_path / f"rank{rank}" / "checkpoint_last.pt") for rank in (0, 1)]
    assert [r["optimizer_history"][-1]["num_updates"] for r in ranks] == [10, 10]
    start = read_checkpoint(corpus / "init.pt")["model"]
    first, second = (r["model"] for r in ranks)
    assert first.keys() == second.keys() == start.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    transformer = [name for name in first if name.startswith("encoder.layers.")]
    assert all(not torch.equal(first[name], start[name]) for name in transformer)
    counts = [json.loads((tmp_path / f"layers_run{rank}.json").read_text()) for rank in (0, 1)]
    assert all(c["layers"] == 2 * 10 for c in counts)  # 2 layers, one forward per update
    assert any(c["ran"] < c["layers"] for c in counts), f"layerdrop skipped no layer: {counts}"
