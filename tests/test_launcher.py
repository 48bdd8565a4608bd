"""The launcher behind scripts/run_cpt.sh, through the real command: inputs in the layouts users
have (culturemert.testing), an HF folder's fresh heads trained in stage 1, the run's own update
counts winning over the preset, a run folder that refuses every input it was not made from, a
stage stopped after its last checkpoint, run names Hydra's grammar gives meaning to, and runs
behind torchrun (the LAUNCH they need, workers that die with the run, the world size kept)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_training import corpus  # noqa: F401  (the module-scoped fixture: rendered clips, caches)

from culturemert.checkpoint import load_model, read_checkpoint, read_hf
from culturemert.hf_format import HEAD_PREFIXES
from culturemert.models.config import MertConfig
from culturemert.testing import write_hub_folder, write_release_checkpoint
from culturemert.training import fingerprint

REPO = Path(__file__).resolve().parents[1]
TINY = MertConfig(**yaml.safe_load((REPO / "configs/model/tiny.yaml").read_text()))


def run_cpt(run: str, *overrides: str, **env: str | Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PRESET": "tiny", **{key: str(value) for key, value in env.items()}}
    return subprocess.run(
        ["bash", str(REPO / "scripts/run_cpt.sh"), run, *overrides],
        env=environment, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def refusal(result: subprocess.CompletedProcess) -> str:
    """The one-line message of a refused run: exit status 2, no traceback."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("run_cpt.sh: ")]
    return line


def updates(checkpoint: Path) -> int:
    return read_checkpoint(checkpoint)["optimizer_history"][-1]["num_updates"]


# --- The builders of inputs in the users' layouts.


def test_release_checkpoint_has_the_published_layout_and_loads(tmp_path):
    path = tmp_path / "MERT-v1-95M_fairseq.pt"
    state = write_release_checkpoint(path, TINY, seed=1)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["args"] is None and type(checkpoint["cfg"]) is dict
    assert checkpoint["cfg"]["model"]["_name"] == "mert" and "label_rate" in checkpoint["cfg"]["model"]
    assert {"task", "criterion", "optimizer", "lr_scheduler"} <= set(checkpoint["cfg"])
    assert checkpoint["optimizer_history"][-1]["num_updates"] > 0
    assert checkpoint["last_optimizer_state"]["state"] and checkpoint["extra_state"]
    model = checkpoint["model"]
    assert model["label_embs_concat"].shape == (8 * 1028, TINY.final_dim)
    assert {"encoder.pos_conv.0.weight_g", "encoder.pos_conv.0.weight_v"} <= set(model)
    kernels = {k for k in model if k.startswith("encoder_cqt_model.spec_layer.")}
    assert {k.rsplit(".", 1)[1] for k in kernels} == {"lenghts", "cqt_kernels_real", "cqt_kernels_imag"}
    loaded = load_model(path).state_dict()
    assert loaded.keys() == set(model) - kernels
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
@pytest.mark.parametrize("legacy", [True, False])
def test_hub_folder_holds_the_backbone_under_hub_names(tmp_path, weights, legacy):
    state = write_hub_folder(tmp_path, TINY, weights=weights, legacy_weight_norm=legacy)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mert_model" and "culturemert" not in config
    assert (tmp_path / ("model.safetensors" if weights == "safetensors" else "pytorch_model.bin")).is_file()
    cfg, backbone = read_hf(tmp_path)
    assert cfg.conv_layers == TINY.conv_layers  # written out as a list, not in the YAML's notation
    cfg.conv_feature_layers = TINY.conv_feature_layers
    assert cfg.architecture(heads=False) == TINY.architecture(heads=False)
    assert backbone.keys() == {k for k in state if not k.startswith(HEAD_PREFIXES)}
    assert all(torch.equal(backbone[k], state[k]) for k in backbone)


# --- A run from an HF folder, and what its folder refuses.


@pytest.fixture(scope="module")
def hf_run(corpus, tmp_path_factory) -> tuple[Path, dict, str]:  # noqa: F811
    """The demo run (100 + 150 updates) from an HF folder as on the Hub, PRESET=tiny."""
    root = tmp_path_factory.mktemp("hf_run")
    write_hub_folder(root / "MERT-v1-95M", TINY, weights="bin", legacy_weight_norm=True)
    env = {"INIT": root / "MERT-v1-95M", "MANIFESTS": corpus / "manifests", "CPT_OUT": root / "runs"}
    result = run_cpt("demo", **env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return root / "runs" / "demo", env, result.stderr


def test_hf_start_trains_the_fresh_heads_in_stage1_and_the_run_keeps_its_own_update_counts(hf_run):
    run, _, log = hf_run
    assert "stage 1 trains them" in log and "optimization.max_update=100" in log
    start = read_checkpoint(run / "init.pt")["model"]
    stage1 = read_checkpoint(run / "stage1" / "checkpoint_last.pt")["model"]
    for name in start:
        trains = name.startswith(("feature_extractor.", *HEAD_PREFIXES))
        assert torch.equal(stage1[name], start[name]) != trains, name
    # configs/cpt/demo_stage*.yaml ask for 100 and 150 updates; the tiny preset does not cut them.
    assert updates(run / "stage1" / "checkpoint_last.pt") == 100
    assert updates(run / "stage2" / "checkpoint_last.pt") == 150
    from transformers import HubertModel

    HubertModel.from_pretrained(run / "hf")


def test_rerun_with_the_same_inputs_skips_the_finished_stages(hf_run, tmp_path):
    run, env, _ = hf_run
    copy = tmp_path / "demo"
    shutil.copytree(run, copy)  # its lock file stays behind, no longer held: taken over
    result = run_cpt("demo", **{**env, "CPT_OUT": tmp_path})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "stage 1 already finished" in result.stderr and "stage 2 already finished" in result.stderr


def changed_manifest(corpus: Path, tmp_path: Path) -> Path:  # noqa: F811
    """A copy of the corpus's manifests whose stage-1 valid.tsv lists the training clips, with
    the matching token cache: consistent, but not what the run was made from."""
    manifests = tmp_path / "manifests"
    shutil.copytree(corpus / "manifests", manifests)
    shutil.copy(manifests / "stage1/train.tsv", manifests / "stage1/valid.tsv")
    shutil.rmtree(manifests / "tokens/stage1/valid")
    shutil.copytree(manifests / "tokens/stage1/train", manifests / "tokens/stage1/valid")
    return manifests


@pytest.mark.parametrize(
    "change, named",
    [
        ("init", "init.sha256"),
        ("override", "stage1.config.optimization.max_update: 100 -> 31"),
        ("manifest", "stage1.data.valid.tsv"),
        ("ablation", "stage1.config.task.mixup_prob: 0.5 -> 0.0"),
    ],
)
def test_a_run_folder_refuses_inputs_it_was_not_made_from(hf_run, corpus, tmp_path, change, named):  # noqa: F811
    run, env, _ = hf_run
    shutil.copytree(run, tmp_path / "demo")
    env = {**env, "CPT_OUT": tmp_path}
    overrides = []
    if change == "init":
        env["INIT"] = corpus / "release.pt"
    elif change == "override":
        overrides = ["optimization.max_update=31"]
    elif change == "manifest":
        env["MANIFESTS"] = changed_manifest(corpus, tmp_path)
    else:
        env["ABLATION"] = "no_mixup"
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("*") if p.name != "lock"}

    message = refusal(run_cpt("demo", *overrides, **env))

    assert named in message and "RESTART=1" in message and "NAME" in message
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("*") if p.name != "lock"} == before


def test_a_second_run_in_a_folder_in_use_is_refused_at_once(corpus, tmp_path):  # noqa: F811
    env = {"INIT": corpus / "init.pt", "MANIFESTS": corpus / "manifests", "CPT_OUT": tmp_path}
    with fingerprint.run_lock(tmp_path / "demo"):
        message = refusal(run_cpt("demo", **env))
    assert f"{tmp_path / 'demo'} is in use by pid {os.getpid()}" in message
    assert not (tmp_path / "demo" / fingerprint.FINGERPRINT).exists()


def test_an_override_of_a_setting_that_does_not_exist_is_refused(corpus, tmp_path):  # noqa: F811
    env = {"INIT": corpus / "init.pt", "MANIFESTS": corpus / "manifests", "CPT_OUT": tmp_path}
    message = refusal(run_cpt("demo", "+task.mixup_probability=0", **env))
    assert "task.mixup_probability" in message
    assert not (tmp_path / "demo").exists()


def test_restart_moves_the_old_folder_aside_and_leftovers_without_a_fingerprint_are_refused(tmp_path):
    run = tmp_path / "makam"
    (run / "stage1").mkdir(parents=True)
    with pytest.raises(fingerprint.RunFolderError, match="no fingerprint.json"):
        fingerprint.check_or_record(run, {"init": {"sha256": "a"}})
    moved = fingerprint.move_aside(run)
    assert not run.exists() and (moved / "stage1").is_dir() and moved.name.startswith("makam.replaced-")
    assert fingerprint.check_or_record(run, {"init": {"sha256": "a"}})
    assert not fingerprint.check_or_record(run, {"init": {"sha256": "a", "path": "moved/elsewhere"}})


def test_a_stage_stopped_after_its_last_checkpoint_is_finished_without_another_update(hf_run, tmp_path):
    run, env, _ = hf_run
    shutil.copytree(run, tmp_path / "demo")
    # Killed after fairseq saved stage 2's last checkpoint, before the launcher wrote `finished`.
    (tmp_path / "demo" / "stage2" / "finished").unlink()
    last = tmp_path / "demo" / "stage2" / "checkpoint_last.pt"
    saved = last.stat().st_mtime_ns
    result = run_cpt("demo", **{**env, "CPT_OUT": tmp_path})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "stage 2 already made its 150 updates" in result.stderr
    assert updates(last) == 150 and last.stat().st_mtime_ns == saved
    assert (tmp_path / "demo" / "stage2" / "finished").is_file()


def test_a_run_named_with_spaces_brackets_commas_quotes_and_accents_trains(corpus, tmp_path):  # noqa: F811
    out, name = tmp_path / "out [1]", "makam (v2), é {x}=it's"
    env = {"INIT": corpus / "init.pt", "MANIFESTS": corpus / "manifests", "CPT_OUT": out, "NAME": name}
    result = run_cpt("demo", "optimization.max_update=2", **env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert updates(out / name / "stage2" / "checkpoint_last.pt") == 2
    assert (out / name / "stage2" / "hydra" / "hydra_train.log").is_file()


# --- Runs behind torchrun (CPU processes over gloo).


def test_launch_torchrun_without_a_torchrun_command_is_refused(corpus, tmp_path):  # noqa: F811
    env = {"INIT": corpus / "init.pt", "MANIFESTS": corpus / "manifests", "CPT_OUT": tmp_path, "LAUNCH": ""}
    message = refusal(run_cpt("demo", "+launch=torchrun_cpu", **env))
    assert "+launch=torchrun" in message and "LAUNCH" in message
    assert not (tmp_path / "demo").exists()


def processes_of(run: Path) -> dict[int, int]:
    """pid -> parent pid of the live processes whose command line names ``run``."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            command = (stat.parent / "cmdline").read_bytes().decode(errors="replace")
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if str(run) in command and fields[0] != "Z":
            found[int(stat.parent.name)] = int(fields[1])
    return found


@pytest.fixture(scope="module")
def torchrun_killed(corpus, tmp_path_factory) -> tuple[Path, dict, list[int]]:  # noqa: F811
    """A run behind ``torchrun --nproc_per_node 2`` whose process group was killed (SIGKILL) once
    stage 1 saved a checkpoint; with the pids its two training workers had."""
    root = tmp_path_factory.mktemp("torchrun")
    env = {"INIT": corpus / "init.pt", "MANIFESTS": corpus / "manifests", "CPT_OUT": root}
    env["LAUNCH"] = "torchrun --standalone --nproc_per_node 2"
    overrides = ["+launch=torchrun_cpu", "optimization.max_update=400"]
    environment = {**os.environ, "PRESET": "tiny", **{key: str(value) for key, value in env.items()}}
    command = ["bash", str(REPO / "scripts/run_cpt.sh"), "demo", *overrides]
    log = root / "run.log"
    with log.open("w") as output:
        launcher = subprocess.Popen(
            command, env=environment, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while not (root / "demo" / "stage1" / "checkpoint_last.pt").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)
        processes = processes_of(root / "demo")
        workers = [pid for pid, parent in processes.items() if parent in processes]  # the agent's children
        assert len(workers) == 2, processes
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        yield root / "demo", env, workers
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_torchrun_workers_die_with_the_run_they_belong_to(torchrun_killed):
    run, _, workers = torchrun_killed
    deadline = time.monotonic() + 10
    while processes_of(run) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(workers) & set(processes_of(run))


def test_a_torchrun_run_refuses_another_world_size(torchrun_killed, tmp_path):
    run, env, _ = torchrun_killed
    shutil.copytree(run, tmp_path / "demo")
    assert json.loads((run / fingerprint.FINGERPRINT).read_text())["launch"] == {"world_size": 2}
    env = {**env, "CPT_OUT": tmp_path, "LAUNCH": "torchrun --standalone --nproc_per_node 1"}
    message = refusal(run_cpt("demo", "+launch=torchrun_cpu", "optimization.max_update=400", **env))
    assert "launch.world_size: 2 -> 1" in message
