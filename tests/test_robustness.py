"""Robustness end to end through the command-line tools (issue #7).

Bad inputs (corrupt, zero-length, non-audio and NaN files, clips shorter than the minimum, empty
manifests, manifests naming missing files, a token cache of another manifest, mismatched models,
probe tasks with unknown ids) are refused with exit status 2 and a message naming the file and
the problem, never a traceback; stereo 44.1 kHz recordings are prepared like any other. A run
killed with SIGKILL (token extraction, training, feature extraction) completes on rerun with the
outputs of an uninterrupted run. The audio is real music rendered from music21 scores, plus
files crafted here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
import yaml
from conftest import tiny_config

from culturemert.audio import HOP_LENGTH, SAMPLE_RATE, load_audio
from culturemert.checkpoint import read_checkpoint, save_fairseq
from culturemert.data.manifest import read_manifest, write_manifest
from culturemert.data.splits import EVALUATION_DATASETS
from culturemert.models.mert import MertConfig, MertModel
from culturemert.music_corpus import render_collection
from culturemert.targets.encodec_teacher import EncodecTeacher
from culturemert.targets.token_cache import TokenCache, build_token_cache

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds any one command may take
# One thread per tool: the tests share a few cores, run two tools side by side, and compare the
# bytes of outputs written by different processes.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CLIPS, CLIP_SECONDS = 5, 5
SHORT_SAMPLES = 12_000  # 0.5 s: shorter than the 1 s clips the tiny training preset needs
TRAIN_UPDATES = 6  # 3 training clips in batches of 2: 2 updates per epoch


# --- Running the tools.


def run_tool(command: list[str | Path], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**ENV, **(env or {})},
    )


def run_script(script: str, *args: str | Path) -> subprocess.CompletedProcess:
    return run_tool([sys.executable, REPO / "scripts" / script, *args])


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def refusal(result: subprocess.CompletedProcess, tool: str) -> list[str]:
    """The message of a refused run, which must exit with status 2 without a traceback and print
    one stderr line starting with ``<tool>: ``; returned with its indented continuation lines."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    lines = result.stderr.splitlines()
    starts = [index for index, line in enumerate(lines) if line.startswith(f"{tool}: ")]
    assert len(starts) == 1, result.stderr[-4000:]
    message = [lines[starts[0]]]
    for line in lines[starts[0] + 1 :]:
        if not line.startswith((" ", "\t")):
            break
        message.append(line)
    return message


@contextlib.contextmanager
def running(command: list[str | Path], log: Path) -> Iterator[subprocess.Popen]:
    """`command` started in a process group of its own, its output going to `log`; the group is
    killed on leaving the context if the command is still running (a test that failed)."""
    with log.open("w") as output:
        process = subprocess.Popen(
            [str(part) for part in command],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=ENV,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def finish(process: subprocess.Popen, log: Path) -> None:
    """Wait for a running command and check that it succeeded."""
    process.wait(timeout=TIMEOUT)
    assert process.returncode == 0, log.read_text()[-4000:]


def kill_once_written(command: list[str | Path], written: Path, log: Path) -> None:
    """Run `command` until `written` exists, then SIGKILL its whole process group."""
    deadline = time.monotonic() + TIMEOUT
    with running(command, log) as process:
        while not written.exists():
            assert process.poll() is None, f"ended before writing {written}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"{written} did not appear within {TIMEOUT} s"
            time.sleep(0.05)


def interrupted_and_uninterrupted_runs(
    command: Callable[[Path], list[str | Path]],
    first_output: str,
    check_killed: Callable[[Path], None],
    tmp_path: Path,
) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """Run ``command(out)`` twice side by side: to completion into `tmp_path`/uninterrupted, and
    into `tmp_path`/interrupted killed with SIGKILL as soon as its `first_output` (a path inside
    `out`) exists, then checked with `check_killed` and rerun to completion. Returns both output
    folders and the rerun's result."""
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    log = tmp_path / "uninterrupted.log"
    with running(command(uninterrupted), log) as reference:
        kill_once_written(command(interrupted), interrupted / first_output, tmp_path / "killed.log")
        check_killed(interrupted)
        rerun = succeeded(run_tool(command(interrupted)))
        finish(reference, log)
    return uninterrupted, interrupted, rerun


def some_parts_written(out: Path) -> None:
    """Check that a killed extraction left some but not all of its parts (one per clip)."""
    parts = list((out / ".partial").glob("part-*.npz"))
    assert 0 < len(parts) < CLIPS and not (out / "meta.json").exists(), parts


def assert_same_files(folder: Path, reference: Path, names: list[str]) -> None:
    for name in names:
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name


# --- Inputs: rendered music and crafted files.


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread in this process too: with more busy threads than free cores (a shared
    machine), torch slows down up to tenfold (EnCodec, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    """Five fiddle tunes rendered as 5 s mono 24 kHz WAVs (25 s of distinct music)."""
    rendered = render_collection("fiddle", tmp_path_factory.mktemp("clips"), CLIPS, seed=0, max_seconds=5)
    return [path for path, _ in rendered]


@pytest.fixture(scope="module")
def music(clips) -> np.ndarray:
    """The clips end to end."""
    return np.concatenate([load_audio(path) for path in clips])


def looped(music: np.ndarray, seconds: int) -> np.ndarray:
    """`seconds` of `music`, repeated as often as needed."""
    return np.tile(music, -(-seconds * SAMPLE_RATE // len(music)))[: seconds * SAMPLE_RATE]


def manifest_of(path: Path, root: Path, files: list[Path]) -> Path:
    """Write a manifest at `path` listing `files` (all under `root`) with their lengths."""
    write_manifest(path, root, [(str(file.relative_to(root)), sf.info(file).frames) for file in files])
    return path


def write_garbled(path: Path, audio: np.ndarray) -> None:
    """A WAV whose RIFF header is overwritten."""
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(b"\x00garbled\x00\x00\x00\x00" + data[12:])


def write_truncated(path: Path, audio: np.ndarray) -> None:
    """A WAV cut off halfway through its samples."""
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_zero_length(path: Path, audio: np.ndarray) -> None:
    """A well-formed WAV that holds no samples."""
    sf.write(path, audio[:0], SAMPLE_RATE, subtype="PCM_16")


def write_non_audio(path: Path, audio: np.ndarray) -> None:
    """A text file named .wav."""
    path.write_text("path,split\nthis file is not audio,train\n")


def write_nan(path: Path, audio: np.ndarray) -> None:
    """A 32-bit float WAV with NaN samples in the middle."""
    audio = audio.copy()
    audio[len(audio) // 2 : len(audio) // 2 + 100] = np.nan
    sf.write(path, audio, SAMPLE_RATE, subtype="FLOAT")


# kind -> (writer, what the message must say). A manifest lists each at the audio's full length.
BAD_AUDIO: dict[str, tuple[Callable[[Path, np.ndarray], None], str]] = {
    "garbled": (write_garbled, "not readable as audio"),
    "truncated": (write_truncated, "rebuild the manifest"),
    "zero-length": (write_zero_length, "contains no samples"),
    "non-audio": (write_non_audio, "not readable as audio"),
    "nan": (write_nan, "NaN"),
}


@pytest.fixture(scope="module")
def teacher(music) -> EncodecTeacher:
    """A data-initialised EnCodec teacher calibrated on the clips."""
    return EncodecTeacher.from_data(torch.from_numpy(music)[None], seed=0)


@pytest.fixture(scope="module")
def teacher_file(teacher, tmp_path_factory) -> Path:
    """The teacher as an EnCodec checkpoint, for extract_tokens.py --encodec."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.th"
    teacher.save(path)
    return path


# --- Data preparation.


@pytest.fixture(scope="module")
def splits_root(tmp_path_factory) -> Path:
    """Evaluation splits of the six probing datasets without any recording: the leak guard runs
    and finds nothing, whether or not the published splits are beside the repository."""
    root = tmp_path_factory.mktemp("splits")
    for dataset in EVALUATION_DATASETS:
        (root / dataset).mkdir()
        for split in ("valid", "test"):
            np.save(root / dataset / f"{split}.npy", np.array([], dtype=str))
    return root


def prepare_data(culture: Path, splits_root: Path, out: Path) -> subprocess.CompletedProcess:
    """scripts/prepare_data.py on a makam run without replay whose training split is every file
    of `culture`, with budgets (1 h a stage) that take all of its audio."""
    split = culture.with_name("split.csv")
    split.write_text("".join(f"{path.name},train\n" for path in sorted(culture.iterdir())))
    return run_script(
        "prepare_data.py", "--run", "makam", "--culture", f"makam={culture}", "--split", f"makam={split}",
        "--replay-share", "0", "--stage1-hours", "1", "--stage2-hours", "1",
        "--splits-root", splits_root, "--out", out,
    )  # fmt: skip


def test_prepare_data_downmixes_stereo_44k_and_drops_recordings_shorter_than_a_segment(
    music, splits_root, tmp_path
):
    culture = tmp_path / "culture"
    culture.mkdir()
    stereo = soxr.resample(looped(music, 40), SAMPLE_RATE, 44_100)
    sf.write(culture / "stereo.wav", np.stack([stereo, 0.5 * stereo], axis=1), 44_100, subtype="PCM_16")
    sf.write(culture / "short.wav", music[: 3 * SAMPLE_RATE], SAMPLE_RATE, subtype="PCM_16")  # < 5 s

    succeeded(prepare_data(culture, splits_root, tmp_path / "out"))

    out = tmp_path / "out" / "makam"
    segments = {}
    for split in ("train", "valid"):
        manifest = read_manifest(out / "stage2" / f"{split}.tsv")
        segments.update(zip(manifest.files, manifest.num_samples.tolist()))
    # 40 s at 44.1 kHz: a 30 s segment and a 10 s tail at 24 kHz; the 3 s recording gives none.
    assert segments == {
        "makam/stereo_0000.flac": 30 * SAMPLE_RATE,
        "makam/stereo_0001.flac": 10 * SAMPLE_RATE,
    }
    downmix = load_audio(culture / "stereo.wav")
    for index, (name, length) in enumerate(sorted(segments.items())):
        info = sf.info(out / "audio" / name)
        assert (info.samplerate, info.channels, info.frames) == (SAMPLE_RATE, 1, length)
        segment, _ = sf.read(out / "audio" / name, dtype="float32")
        start = index * 30 * SAMPLE_RATE
        np.testing.assert_allclose(segment, downmix[start : start + length], atol=1e-4)
    provenance = json.loads((out / "provenance.json").read_text())["sources"]["makam"]
    assert (provenance["recordings"], provenance["segments"]) == (2, 2)


# Not "truncated": data preparation reads a truncated WAV as the shorter recording it now is.
@pytest.mark.parametrize("kind", ["garbled", "zero-length", "non-audio", "nan"])
def test_prepare_data_names_an_unusable_recording_and_writes_no_manifest(kind, music, splits_root, tmp_path):
    culture = tmp_path / "culture"
    culture.mkdir()
    sf.write(culture / "good.wav", looped(music, 40), SAMPLE_RATE, subtype="PCM_16")
    write, problem = BAD_AUDIO[kind]
    write(culture / "bad.wav", music)

    (message,) = refusal(prepare_data(culture, splits_root, tmp_path / "out"), "prepare_data")

    assert str(culture / "bad.wav") in message and problem in message
    assert not list((tmp_path / "out").rglob("*.tsv"))


# --- Token extraction.


def extract_tokens(teacher_file: Path, manifest: Path, out: Path, *options: str) -> list[str | Path]:
    """The command line of scripts/extract_tokens.py."""
    script = REPO / "scripts" / "extract_tokens.py"
    return [sys.executable, script, "--manifest", manifest, "--encodec", teacher_file, "--out", out, *options]


def test_extract_tokens_refuses_a_manifest_naming_a_missing_file(clips, teacher_file, tmp_path):
    manifest = tmp_path / "train.tsv"
    entries = [("missing.wav", SAMPLE_RATE), (clips[0].name, sf.info(clips[0]).frames)]
    write_manifest(manifest, clips[0].parent, entries)

    result = run_tool(extract_tokens(teacher_file, manifest, tmp_path / "tokens"))

    (message,) = refusal(result, "extract_tokens")
    assert str(read_manifest(manifest).audio_path(0)) in message and "no such file" in message
    assert not (tmp_path / "tokens" / "meta.json").exists()


def test_extract_tokens_refuses_an_empty_manifest(clips, teacher_file, tmp_path):
    manifest = tmp_path / "train.tsv"
    write_manifest(manifest, clips[0].parent, [])  # the root line only

    result = run_tool(extract_tokens(teacher_file, manifest, tmp_path / "tokens"))

    (message,) = refusal(result, "extract_tokens")
    assert str(manifest) in message and "lists no audio files" in message


def test_extract_tokens_skip_bad_names_every_unusable_file_and_its_problem(clips, teacher_file, tmp_path):
    audio = load_audio(clips[0])
    for kind, (write, _) in BAD_AUDIO.items():
        write(tmp_path / f"{kind}.wav", audio)
    shutil.copy(clips[0], tmp_path / "good.wav")
    listed = ["good.wav", *(f"{kind}.wav" for kind in BAD_AUDIO), "missing.wav"]
    manifest = tmp_path / "train.tsv"
    write_manifest(manifest, tmp_path, [(name, len(audio)) for name in listed])

    succeeded(run_tool(extract_tokens(teacher_file, manifest, tmp_path / "tokens", "--skip-bad")))

    cache = TokenCache.open(tmp_path / "tokens", manifest)
    frames = [cache.num_frames(row) for row in range(len(listed))]
    assert frames == [math.ceil(len(audio) / HOP_LENGTH)] + [0] * (len(listed) - 1)
    reasons = {skipped["file"]: skipped["reason"] for skipped in cache.meta["skipped"]}
    problems = {f"{kind}.wav": problem for kind, (_, problem) in BAD_AUDIO.items()}
    problems["missing.wav"] = "no such file"
    assert set(reasons) == set(problems)
    for name, problem in problems.items():
        assert str(tmp_path.resolve() / name) in reasons[name] and problem in reasons[name], reasons[name]


def test_token_extraction_killed_with_sigkill_resumes_to_identical_bytes(clips, teacher_file, tmp_path):
    manifest = manifest_of(tmp_path / "train.tsv", clips[0].parent, clips)

    def command(out: Path) -> list[str | Path]:  # one part per clip
        return extract_tokens(teacher_file, manifest, out, "--batch-seconds", str(CLIP_SECONDS))

    uninterrupted, interrupted, rerun = interrupted_and_uninterrupted_runs(
        command, ".partial/part-000000.npz", some_parts_written, tmp_path
    )

    resumed_at = int(re.search(r"extract tokens:\s*(\d+)%", rerun.stderr)[1])
    assert resumed_at > 0, "the rerun started over instead of resuming"
    assert_same_files(interrupted, uninterrupted, ["codes.npy", "offsets.npy", "meta.json"])
    assert not (interrupted / ".partial").exists()


# --- Training.


@pytest.fixture(scope="module")
def cpt_inputs(tmp_path_factory, clips, teacher) -> Path:
    """What run_cpt.sh needs for both stages of a tiny run: manifests (3 clips and one 0.5 s clip
    to train on, 1 to validate on; the same in both stages), their token caches and init.pt, a
    random model of configs/model/tiny.yaml."""
    root = tmp_path_factory.mktemp("cpt")
    audio = root / "audio"
    audio.mkdir()
    for clip in clips[:4]:
        shutil.copy(clip, audio)
    sf.write(audio / "short.wav", load_audio(clips[4])[:SHORT_SAMPLES], SAMPLE_RATE, subtype="PCM_16")
    train = [*(audio / clip.name for clip in clips[:3]), audio / "short.wav"]
    for split, files in (("train", train), ("valid", [audio / clips[3].name])):
        manifest = manifest_of(root / "manifests" / "stage2" / f"{split}.tsv", audio, files)
        build_token_cache(manifest, teacher, root / "manifests" / "tokens" / "stage2" / split, progress=False)
    shutil.copytree(root / "manifests" / "stage2", root / "manifests" / "stage1")
    shutil.copytree(root / "manifests" / "tokens" / "stage2", root / "manifests" / "tokens" / "stage1")
    cfg = MertConfig(**yaml.safe_load((REPO / "configs" / "model" / "tiny.yaml").read_text()))
    torch.manual_seed(0)
    save_fairseq(root / "init.pt", cfg, MertModel(cfg).state_dict())
    return root


def train_command(inputs: Path, save_dir: Path, max_update: int = TRAIN_UPDATES) -> list[str | Path]:
    """fairseq-hydra-train of a tiny stage-2 run from init.pt, validated and saved every 4 updates
    and at the end of every epoch (the tiny preset)."""
    return [
        shutil.which("fairseq-hydra-train"), "--config-dir", REPO / "configs", "--config-name", "stage",
        "+stage=stage2", "+preset=tiny", "+cpt=makam_stage2", "+model=tiny",
        f"common.user_dir={REPO / 'culturemert'}",
        f"task.data={inputs / 'manifests/stage2'}", f"+task.tokens={inputs / 'manifests/tokens/stage2'}",
        f"checkpoint.save_dir={save_dir}", f"checkpoint.finetune_from_model={inputs / 'init.pt'}",
        f"hydra.run.dir={save_dir}", "hydra.job.chdir=false", f"optimization.max_update={max_update}",
    ]  # fmt: skip


def updates(checkpoint: Path) -> int:
    return read_checkpoint(checkpoint)["optimizer_history"][-1]["num_updates"]


def test_training_killed_with_sigkill_resumes_to_the_weights_of_an_uninterrupted_run(cpt_inputs, tmp_path):
    def stopped_midway(save_dir: Path) -> None:
        assert 0 < updates(save_dir / "checkpoint_last.pt") < TRAIN_UPDATES

    uninterrupted, interrupted, _ = interrupted_and_uninterrupted_runs(
        lambda save_dir: train_command(cpt_inputs, save_dir),
        "checkpoint_last.pt",  # first written (atomically) at the end of the first epoch: update 2
        stopped_midway,
        tmp_path,
    )

    log = (uninterrupted / "hydra_train.log").read_text()  # 1 s: the tiny preset's min_sample_size
    assert f"dropped 1 of 4 clips shorter than {SAMPLE_RATE} samples" in log
    last = [run / "checkpoint_last.pt" for run in (uninterrupted, interrupted)]
    assert [updates(checkpoint) for checkpoint in last] == [TRAIN_UPDATES, TRAIN_UPDATES]
    expected, resumed = (read_checkpoint(checkpoint)["model"] for checkpoint in last)
    assert expected.keys() == resumed.keys()
    differences = {
        name: (resumed[name] - expected[name]).abs().max().item()
        for name in expected
        if not torch.equal(resumed[name], expected[name])
    }
    assert not differences, f"largest |resumed - uninterrupted| per differing tensor: {differences}"


def test_a_kill_while_fairseq_copies_to_checkpoint_last_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    """fairseq saves one checkpoint atomically and copies it to checkpoint_last.pt; compat makes
    that copy atomic, so an interruption mid-copy leaves the previous checkpoint_last.pt intact."""
    from fairseq.file_io import PathManager

    from culturemert import compat

    saved, last = tmp_path / "checkpoint_3_12.pt", tmp_path / "checkpoint_last.pt"
    saved.write_bytes(b"new" * 1000)
    last.write_bytes(b"previous")

    def killed_mid_copy(src: str, dst: str) -> None:
        Path(dst).write_bytes(Path(src).read_bytes()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(compat.shutil, "copyfile", killed_mid_copy)
    with pytest.raises(KeyboardInterrupt):
        PathManager.copy(str(saved), str(last), overwrite=True)
    assert last.read_bytes() == b"previous"

    monkeypatch.undo()
    assert PathManager.copy(str(saved), str(last), overwrite=True)
    assert last.read_bytes() == saved.read_bytes()


def test_extract_tokens_refuses_to_overwrite_the_cache_of_another_manifest(cpt_inputs, teacher_file):
    cache = cpt_inputs / "manifests/tokens/stage2/train"
    built = {path.name: path.read_bytes() for path in cache.iterdir()}
    other = cpt_inputs / "manifests/stage2/valid.tsv"

    result = run_tool(extract_tokens(teacher_file, other, cache))

    (message,) = refusal(result, "extract_tokens")
    assert str(cache) in message and str(other) in message and "differ" in message
    assert {path.name: path.read_bytes() for path in cache.iterdir()} == built


def test_run_cpt_refuses_a_token_cache_of_another_manifest(cpt_inputs, tmp_path):
    tokens = tmp_path / "tokens"
    for stage in ("stage1", "stage2"):
        for split in ("train", "valid"):  # every split gets the cache of the valid manifest
            shutil.copytree(cpt_inputs / "manifests" / "tokens" / stage / "valid", tokens / stage / split)
    env = {
        "PRESET": "tiny",
        "INIT": str(cpt_inputs / "init.pt"),
        "MANIFESTS": str(cpt_inputs / "manifests"),
        "TOKENS": str(tokens),
        "CPT_OUT": str(tmp_path / "runs"),
    }

    result = run_tool(["bash", REPO / "scripts" / "run_cpt.sh", "makam"], env=env)

    message = "\n".join(refusal(result, "run_cpt.sh"))
    assert str(tokens / "stage1" / "train") in message
    assert str(cpt_inputs / "manifests" / "stage1" / "train.tsv") in message


# --- Merging.


def test_merge_refuses_models_of_different_widths(tmp_path):
    narrow, wide = tiny_config(), tiny_config(encoder_embed_dim=96)
    for name, cfg in (("base", narrow), ("culture", narrow), ("wider", wide)):
        save_fairseq(tmp_path / f"{name}.pt", cfg, MertModel(cfg).state_dict())

    models = [tmp_path / "culture.pt", tmp_path / "wider.pt"]
    result = run_script(
        "merge.py", "--base", tmp_path / "base.pt", "--models", *models, "--out", tmp_path / "merged"
    )

    header, *problems = refusal(result, "merge")
    assert "different architectures" in header
    assert problems == [f"  {tmp_path / 'wider.pt'}: encoder_embed_dim 96, the base 64"]
    assert not (tmp_path / "merged").exists()


# --- Probing.

MERT_CONV = "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"  # MERT-v1-95M's feature extractor


@pytest.fixture(scope="module")
def probe_model(tmp_path_factory) -> Path:
    """A random 2-layer MERT with the real conv feature extractor: encoding a 5 s clip takes about
    half a second on one thread, long enough to kill an extraction between two recordings."""
    torch.manual_seed(0)
    cfg = tiny_config(conv_feature_layers=MERT_CONV)
    path = tmp_path_factory.mktemp("probe") / "model.pt"
    save_fairseq(path, cfg, MertModel(cfg).state_dict())
    return path


def task_file(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A CSV probing task of (path, split, tags) rows."""
    path.write_text("path,split,tags\n" + "".join(f"{','.join(row)}\n" for row in rows))
    return path


def probe_extract(model: Path, task: Path, audio_root: Path, out: Path, *options: str) -> list[str | Path]:
    """The command line of scripts/probe.py extract."""
    script = REPO / "scripts" / "probe.py"
    return [
        sys.executable, script, "extract", "--model", model, "--task", task, "--audio-root", audio_root,
        "--out", out, *options,
    ]  # fmt: skip


def test_probe_extract_names_task_ids_missing_from_the_audio_root(clips, probe_model, tmp_path):
    rows = [(clips[0].name, "train", "a"), ("absent-0001.wav", "valid", "a"), (clips[1].name, "test", "a")]
    task = task_file(tmp_path / "holey.csv", rows)

    result = run_tool(probe_extract(probe_model, task, clips[0].parent, tmp_path / "features"))

    (message,) = refusal(result, "probe")
    assert "absent-0001" in message and str(clips[0].parent) in message and "no audio file" in message
    assert not (tmp_path / "features").exists()


def test_feature_extraction_killed_with_sigkill_resumes_to_identical_bytes(clips, probe_model, tmp_path):
    splits = ["train", "train", "train", "valid", "test"]
    tags = ["a", "b", "a|b", "a", "b"]
    task = task_file(tmp_path / "tagged.csv", [(clip.name, *row) for clip, *row in zip(clips, splits, tags)])

    def command(out: Path) -> list[str | Path]:  # one part per clip
        return probe_extract(probe_model, task, clips[0].parent, out, "--part-recordings", "1")

    uninterrupted, interrupted, rerun = interrupted_and_uninterrupted_runs(
        command, ".partial/part-000000.npz", some_parts_written, tmp_path
    )

    resumed_at = int(re.search(r"tagged features:\s*(\d+)%", rerun.stderr)[1])
    assert resumed_at > 0, "the rerun started over instead of resuming"
    assert_same_files(
        interrupted, uninterrupted, ["features.npy", "chunk_recording.npy", "labels.npy", "meta.json"]
    )
    assert not (interrupted / ".partial").exists()
