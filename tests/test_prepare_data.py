"""Data preparation (culturemert/cli/prepare_data.py): 30 s segments of training-split audio at 24 kHz mono,
stage budgets with a 20 % replay share, determinism, resuming, and the evaluation-split leak guard."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from culturemert.audio import SAMPLE_RATE, load_audio
from culturemert.cli.prepare_data import main
from culturemert.data.budgets import Segment, closest_prefix, cut, select_mix
from culturemert.data.config import REPLAY, STAGES, load_data_config
from culturemert.data.manifest import read_manifest
from culturemert.data.sources import Recording
from culturemert.data.splits import DEFAULT_SPLITS_ROOT, read_split
from culturemert.errors import UserError
from culturemert.music_corpus import render_collection

REPO = Path(__file__).resolve().parents[1]
SPLITS = DEFAULT_SPLITS_ROOT  # shipped with the package
SEGMENT = 30 * SAMPLE_RATE
# Stage budgets in whole 30 s segments, so a 20 % replay share is reachable exactly:
# stage 1 = 150 s (120 s of culture + 30 s of replay), stage 2 = 180 s of culture.
HOURS = ["--stage1-hours", repr(150 / 3600), "--stage2-hours", repr(180 / 3600)]


def prepare_data(argv: list[str]) -> int:
    """The command as `culturemert.cli.run` runs it (a user error is one line on stderr and status
    2), without its logging set-up: in-process, that would leave the root logger writing to this
    test's captured stderr after the test ends."""
    try:
        return main(argv)
    except UserError as error:
        print(f"prepare_data: {error}", file=sys.stderr)
        return 2


def _cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "scripts" / "prepare_data.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def music(tmp_path_factory) -> np.ndarray:
    """30 s of real music: two rendered fiddle tunes of exactly 15 s each, end to end."""
    rendered = render_collection("fiddle", tmp_path_factory.mktemp("render"), n=2, seed=0, max_seconds=15)
    pieces = [np.pad(load_audio(path), (0, 15 * SAMPLE_RATE))[: 15 * SAMPLE_RATE] for path, _ in rendered]
    return np.concatenate(pieces)


def _write(path: Path, music: np.ndarray, seconds: int, rate: int = SAMPLE_RATE, stereo: bool = False):
    """A recording of `seconds` cut from `music` repeated, at `rate`, mono or stereo."""
    audio = np.tile(music, seconds // 30 + 1)[: seconds * SAMPLE_RATE]
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, SAMPLE_RATE, rate)
    if stereo:
        audio = np.stack([audio, 0.5 * audio], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio, rate, subtype="PCM_16")


@pytest.fixture(scope="module")
def generic(tmp_path_factory, music) -> Path:
    """A culture folder with a path,split CSV (rec-d is stereo 44.1 kHz; rec-c valid, rec-e test)
    and a Western replay folder."""
    root = tmp_path_factory.mktemp("generic")
    _write(root / "culture" / "rec-a.wav", music, 60)
    _write(root / "culture" / "sub" / "rec-b.wav", music, 90)
    _write(root / "culture" / "rec-c.wav", music, 60)
    _write(root / "culture" / "rec-d.wav", music, 60, rate=44100, stereo=True)
    _write(root / "culture" / "rec-e.flac", music, 60)
    _write(root / "western" / "w1.wav", music[::-1], 60)
    _write(root / "western" / "deep" / "w2.flac", music[::-1], 60)
    rows = ["path,split", "rec-a.wav,train", "sub/rec-b.wav,train", "rec-c.wav,valid", "rec-d.wav,train"]
    (root / "split.csv").write_text("\n".join([*rows, "rec-e.flac,test"]) + "\n")
    return root


def _generic_args(root: Path, out: Path, *extra: str) -> list[str]:
    args = [
        "--run",
        "makam",
        "--culture",
        f"makam={root / 'culture'}",
        "--split",
        f"makam={root / 'split.csv'}",
    ]
    args += ["--replay", str(root / "western"), "--splits-root", str(SPLITS), "--out", str(out)]
    return [*args, *HOURS, *extra]


def _recording_id(entry: str) -> str:
    """The recording id of a manifest entry '<source>/<id>_<index>.flac'."""
    return Path(entry).stem.rsplit("_", 1)[0]


def _manifests(out: Path) -> dict[tuple[str, str], list[tuple[str, int]]]:
    manifests = {}
    for stage in STAGES:
        for split in ("train", "valid"):
            manifest = read_manifest(out / stage / f"{split}.tsv")
            manifests[stage, split] = list(zip(manifest.files, manifest.num_samples.tolist()))
    return manifests


def test_cli_on_a_csv_split_cuts_training_audio_into_24k_segments_with_20_percent_replay(generic, tmp_path):
    result = _cli(*_generic_args(generic, tmp_path))

    assert result.returncode == 0, result.stderr
    out = tmp_path / "makam"
    manifests = _manifests(out)
    root = read_manifest(out / "stage1" / "train.tsv").root
    assert root == (out / "audio").resolve()
    for entries in manifests.values():
        for name, length in entries:
            info = sf.info(root / name)
            assert (info.samplerate, info.channels, info.frames) == (SAMPLE_RATE, 1, length)
            assert length == SEGMENT

    stage1 = manifests["stage1", "train"]
    replay = sum(length for name, length in stage1 if name.startswith(f"{REPLAY}/"))
    assert abs(replay / sum(length for _, length in stage1) - 0.2) <= 0.01
    assert sum(length for _, length in manifests["stage2", "train"]) == 180 * SAMPLE_RATE
    assert all(not name.startswith(f"{REPLAY}/") for name, _ in manifests["stage2", "train"])

    used = {_recording_id(name) for entries in manifests.values() for name, _ in entries}
    assert used <= {"rec-a", "rec-b", "rec-d", "w1", "w2"}  # never the valid (rec-c) or test (rec-e) rows
    assert (len(manifests["stage1", "valid"]), len(manifests["stage2", "valid"])) == (2, 1)  # >= 1 a source
    for stage in STAGES:
        train, valid = ({name for name, _ in manifests[stage, split]} for split in ("train", "valid"))
        assert not train & valid
    stage1_culture = {name for name, _ in stage1 if not name.startswith(f"{REPLAY}/")}
    assert stage1_culture <= {name for name, _ in manifests["stage2", "train"]}

    # rec-d is stereo 44.1 kHz: 60 s give two 30 s segments of its 24 kHz mono downmix.
    downmix = load_audio(generic / "culture" / "rec-d.wav")
    assert len(downmix) == 2 * SEGMENT
    for index in range(2):
        segment, _ = sf.read(root / f"makam/rec-d_{index:04d}.flac", dtype="float32")
        np.testing.assert_allclose(segment, downmix[index * SEGMENT : (index + 1) * SEGMENT], atol=1e-4)

    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["seed"] == 0
    assert provenance["stages"]["stage1"]["replay_share"] == pytest.approx(0.2, abs=0.01)
    assert provenance["sources"]["makam"]["split_files"] == [str((generic / "split.csv").resolve())]
    assert provenance["sources"]["makam"]["recordings"] == 3
    assert str((SPLITS / "makam" / "test.npy").resolve()) in provenance["leak_check_split_files"]
    assert "stage1: train 0.042 h in 5 segments (replay 20.0 %)" in result.stdout


def test_cli_on_the_makam_split_layout_uses_only_its_training_ids(music, tmp_path):
    ids = {split: read_split(SPLITS / "makam").ids[split] for split in ("train", "valid", "test")}
    culture = tmp_path / "makam_audio"
    planted = ids["train"][:3]
    _write(culture / "a" / f"{planted[0]}.wav", music, 60)
    _write(culture / "b" / f"{planted[1]}.flac", music, 60)
    _write(culture / f"{planted[2]}.wav", music, 60)
    _write(culture / f"{ids['valid'][0]}.wav", music, 60)  # in the folder, but not a training id
    _write(culture / f"{ids['test'][0]}.wav", music, 60)
    _write(tmp_path / "western" / "w1.wav", music[::-1], 60)
    args = ["--run", "makam", "--culture", f"makam={culture}", "--replay", str(tmp_path / "western")]
    args += ["--splits-root", str(SPLITS), "--out", str(tmp_path / "out"), *HOURS, "--skip-missing"]

    result = _cli(*args)

    assert result.returncode == 0, result.stderr
    manifests = _manifests(tmp_path / "out" / "makam")
    used = {
        _recording_id(name)
        for entries in manifests.values()
        for name, _ in entries
        if name.startswith("makam/")
    }
    assert used <= set(planted) and len(used) >= 2
    provenance = json.loads((tmp_path / "out" / "makam" / "provenance.json").read_text())
    assert len(provenance["sources"]["makam"]["missing_skipped"]) == len(ids["train"]) - 3
    assert provenance["sources"]["makam"]["split_files"][0].endswith("makam/train.npy")


def test_missing_training_ids_are_listed(music, tmp_path, capsys):
    culture = tmp_path / "makam_audio"
    _write(culture / f"{read_split(SPLITS / 'makam').train[0]}.wav", music, 60)

    args = ["--run", "makam", "--culture", f"makam={culture}", "--replay", str(culture)]
    status = prepare_data([*args, "--out", str(tmp_path / "out")])  # the default --splits-root

    message = capsys.readouterr().err
    assert status == 2 and not (tmp_path / "out").exists()
    assert message.startswith("prepare_data: makam: ") and "training ids have no audio file" in message
    assert "--skip-missing" in message and message.count("\n") == 1


def test_same_seed_same_manifests_resumed_from_written_segments_other_seed_other_data(generic, tmp_path):
    audio = tmp_path / "audio"
    assert prepare_data(_generic_args(generic, tmp_path / "a", "--audio-out", str(audio))) == 0
    written = {path: path.stat().st_mtime_ns for path in audio.rglob("*.flac")}
    assert prepare_data(_generic_args(generic, tmp_path / "b", "--audio-out", str(audio))) == 0
    assert prepare_data(_generic_args(generic, tmp_path / "c", "--audio-out", str(audio), "--seed", "1")) == 0

    first, again, other = (tmp_path / run / "makam" for run in ("a", "b", "c"))
    for stage in STAGES:
        for split in ("train", "valid"):
            assert (first / stage / f"{split}.tsv").read_bytes() == (
                again / stage / f"{split}.tsv"
            ).read_bytes()
    assert {path: path.stat().st_mtime_ns for path in written} == written  # kept, not rewritten
    resumed = json.loads((again / "provenance.json").read_text())
    assert resumed["segments_written"] == 0 and resumed["segments_kept"] == len(written)
    assert _manifests(first)["stage1", "train"] != _manifests(other)["stage1", "train"]


def test_leak_check_refuses_a_planted_test_item_and_writes_nothing(generic, music, tmp_path, capsys):
    test_id = read_split(SPLITS / "makam").ids["test"][0]
    culture = tmp_path / "culture"
    _write(culture / "rec-a.wav", music, 60)
    _write(culture / f"{test_id}.wav", music, 30)
    (tmp_path / "split.csv").write_text(f"rec-a.wav,train\n{test_id}.wav,train\n")
    args = ["--run", "makam", "--culture", f"makam={culture}", "--split", f"makam={tmp_path / 'split.csv'}"]
    args += [
        "--replay",
        str(generic / "western"),
        "--splits-root",
        str(SPLITS),
        "--out",
        str(tmp_path / "out"),
    ]

    status = prepare_data(args)

    message = capsys.readouterr().err
    assert status == 2
    assert str(culture / f"{test_id}.wav") in message and "makam test" in message and "refusing" in message
    assert not (tmp_path / "out").exists()


def test_files_that_are_not_audio_are_logged_and_an_excel_split_csv_is_read(generic, tmp_path, caplog):
    root = tmp_path / "generic"
    shutil.copytree(generic, root)
    (root / "culture" / "notes.txt").write_text("recorded in 2019")
    (root / "western" / "w4.m4a").write_bytes(b"an MP4 container soundfile does not read")
    (root / "western" / "deep" / "cover.jpg").write_bytes(b"a picture")
    split = (root / "split.csv").read_text().replace("\n", "\r\n")
    (root / "culture" / "split.csv").write_bytes(b"\xef\xbb\xbf" + split.encode())  # as Excel saves it
    args = _generic_args(root, tmp_path / "out")
    args[args.index(f"makam={root / 'split.csv'}")] = f"makam={root / 'culture' / 'split.csv'}"

    with caplog.at_level(logging.WARNING, logger="prepare_data"):
        assert prepare_data(args) == 0

    skipped = {record.getMessage().split(":")[0]: record.getMessage() for record in caplog.records}
    assert "skipping 1 file(s)" in skipped["makam"] and "notes.txt" in skipped["makam"]
    assert "split.csv" not in skipped["makam"]  # the split file the command was given is not audio it skips
    assert "skipping 2 file(s)" in skipped[REPLAY]
    assert "w4.m4a" in skipped[REPLAY] and str(Path("deep", "cover.jpg")) in skipped[REPLAY]
    provenance = json.loads((tmp_path / "out" / "makam" / "provenance.json").read_text())
    assert provenance["sources"]["makam"]["recordings"] == 3


def test_segments_are_30_s_from_the_start_with_tails_of_at_least_5_s():
    def lengths(seconds: float) -> list[int]:
        recording = Recording("makam", "x", Path("x.wav"), round(seconds * SAMPLE_RATE))
        return [segment.num_samples for segment in cut(recording, SEGMENT, 5 * SAMPLE_RATE)]

    assert lengths(75) == [SEGMENT, SEGMENT, 15 * SAMPLE_RATE]
    assert lengths(64) == [SEGMENT, SEGMENT]  # a 4 s tail is dropped
    assert lengths(4) == []
    assert lengths(29.5) == [round(29.5 * SAMPLE_RATE)]


def _segments(source: str, seconds: list[int]) -> list[Segment]:
    """One single-segment recording per entry of `seconds`."""
    recordings = [
        Recording(source, f"{source}{i}", Path(f"{i}.wav"), s * SAMPLE_RATE) for i, s in enumerate(seconds)
    ]
    return [Segment(recording, 0, 0, recording.num_samples) for recording in recordings]


def test_budgets_take_the_closest_prefix_and_keep_the_replay_share_when_replay_runs_short():
    order = _segments("makam", [30, 30, 10, 30])
    assert [s.num_samples // SAMPLE_RATE for s in closest_prefix(order, 65 * SAMPLE_RATE)] == [30, 30]
    assert [s.num_samples // SAMPLE_RATE for s in closest_prefix(order, 69 * SAMPLE_RATE)] == [30, 30, 10]
    assert len(closest_prefix(order, 10_000 * SAMPLE_RATE)) == 4

    pools = {"makam": _segments("makam", [30] * 20), REPLAY: _segments(REPLAY, [30] * 2)}
    mix = select_mix({"makam": 480 * SAMPLE_RATE, REPLAY: 120 * SAMPLE_RATE}, pools, share=0.2)
    hours = {name: sum(s.num_samples for s in chosen) / SAMPLE_RATE for name, chosen in mix.items()}
    assert hours == {"makam": 240, REPLAY: 60}  # 60 s of replay: the culture shrinks to keep 20 %


def test_run_configs_hold_the_thesis_budgets():
    expected = {
        "makam": (60, 200),
        "hindustani": (60, 200),
        "carnatic": (60, 200),
        "lyra": (20, 50),
        "multi": (100, 650),
    }
    for run, (stage1, stage2) in expected.items():
        config = load_data_config(REPO / "configs" / "data" / f"{run}.yaml")
        assert config.stage_hours == {"stage1": stage1, "stage2": stage2}
        assert (config.replay_share, config.replay_stages, config.segment_seconds) == (0.2, ("stage1",), 30)
        assert sum(config.targets("stage2").values()) == stage2 * 3600 * SAMPLE_RATE

    multi = load_data_config(REPO / "configs" / "data" / "multi.yaml")
    assert multi.cultures == {"makam": 200, "hindustani": 200, "carnatic": 200, "lyra": 50}
    stage1 = {name: samples / SAMPLE_RATE / 3600 for name, samples in multi.targets("stage1").items()}
    assert stage1[REPLAY] == pytest.approx(20)
    assert stage1["makam"] == pytest.approx(80 * 200 / 650) and stage1["lyra"] == pytest.approx(80 * 50 / 650)


def test_split_readers_take_ids_from_every_format():
    lyra = read_split(SPLITS / "lyra")
    mtat = read_split(SPLITS / "magnatagatune")
    fma = read_split(SPLITS / "fma")

    # Lyra's validation split is the fixed carve shipped with the splits (lyra/valid.txt).
    assert set(lyra.ids) == {"train", "valid", "test"} and "ach-ellada" in lyra.train
    assert (len(lyra.train), len(lyra.ids["valid"])) == (1116, 124)
    assert set(mtat.ids) == {"valid", "test"}
    assert mtat.ids["valid"][0] == "lvx_nova-lvx_nova-01-contimune-30-59"
    assert len(fma.ids["test"]) == 4996 and all(len(track) == 6 for track in fma.ids["test"])
