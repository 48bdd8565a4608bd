"""Data preparation and probing tasks against bad input: pickled split and metadata files, leaks
into training (case, extension, Lyra's carve), changed recordings, clipping, unreadable files,
duplicate manifest rows, tags dropped from a split; the shipped splits need nothing beside the
repository. Through the real command where it is a command's behaviour."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from culturemert.audio import SAMPLE_RATE, load_audio
from culturemert.data.manifest import ManifestError, read_manifest
from culturemert.data.splits import DEFAULT_SPLITS_ROOT, EVALUATION_DATASETS, read_split
from culturemert.probing.tasks import TaskError, find_audio, load_csv_task, load_task, lyra_valid_carve

REPO = Path(__file__).resolve().parents[1]
SECONDS = 35  # one 30 s segment and a 5 s tail at the default segment policy


def prepare_data(*args: str | Path) -> subprocess.CompletedProcess:
    command = [sys.executable, REPO / "scripts" / "prepare_data.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=300, env=env
    )


def refused(result: subprocess.CompletedProcess) -> str:
    """The one-line message of a run refused with status 2 and no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("prepare_data: ")]
    return line


def noise(
    path: Path, seed: int, seconds: float = SECONDS, scale: float = 0.3, subtype: str = "PCM_16"
) -> np.ndarray:
    audio = (scale * np.random.default_rng(seed).standard_normal(round(seconds * SAMPLE_RATE))).astype(
        np.float32
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio, SAMPLE_RATE, subtype=subtype)
    return sf.read(path, dtype="float32")[0]  # as stored: 16-bit PCM clips and rounds


def makam_run(
    culture: Path, out: Path, *extra: str | Path, split: Path | None = None
) -> subprocess.CompletedProcess:
    """prepare_data.py on a makam run without replay whose training split is every file of
    `culture` (unless `split`), against the shipped evaluation splits, taking all the audio."""
    if split is None:
        split = culture.with_name("split.csv")
        split.write_text("".join(f"{path.name},train\n" for path in sorted(culture.iterdir())))
    return prepare_data(
        "--run", "makam", "--culture", f"makam={culture}", "--split", f"makam={split}",
        "--replay-share", "0", "--stage1-hours", "1", "--stage2-hours", "1", "--out", out, *extra,
    )  # fmt: skip


class Plant:
    """A pickle payload: loading it creates a file (what any code in a pickle could do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# --- No pickle from data (issue 11 item 1, issue 10 item 5).


def test_the_shipped_splits_read_without_pickle_and_fma_metadata_is_json():
    for dataset in EVALUATION_DATASETS:
        for path in (DEFAULT_SPLITS_ROOT / dataset).glob("*.npy"):
            assert np.load(path, allow_pickle=False).dtype.kind == "U", path
    metadata = json.loads((DEFAULT_SPLITS_ROOT / "fma" / "metadata.json").read_text())
    fma = read_split(DEFAULT_SPLITS_ROOT / "fma")
    assert len(metadata) == 25000 and all(track in metadata for ids in fma.ids.values() for track in ids)
    assert metadata["000002"] == ["Hip-Hop"]
    task = load_task("fma")  # the shipped splits are the default
    assert (len(task.rows("train")), len(task.rows("valid")), len(task.rows("test"))) == (17486, 2498, 4996)


def test_a_pickled_split_file_is_refused_without_running_it(tmp_path):
    split = tmp_path / "split"
    split.mkdir()
    marker = tmp_path / "code-ran"
    np.save(split / "train.npy", np.array([Plant(marker)], dtype=object), allow_pickle=True)
    for name in ("valid", "test"):
        np.save(split / f"{name}.npy", np.array([], dtype=str))
    noise(tmp_path / "culture" / "a.wav", 0)

    message = refused(makam_run(tmp_path / "culture", tmp_path / "out", split=split))

    assert str(split / "train.npy") in message and "pickle" in message and "--trust-pickle" in message
    assert not marker.exists() and not (tmp_path / "out").exists()

    np.save(split / "train.npy", np.array(["a"], dtype=object), allow_pickle=True)  # a pickle of plain ids
    trusted = makam_run(tmp_path / "culture", tmp_path / "out", "--trust-pickle", split=split)
    assert trusted.returncode == 0, trusted.stderr
    files = read_manifest(tmp_path / "out" / "makam" / "stage2" / "train.tsv").files
    assert len(files) == 1 and files[0].startswith("makam/a_")


def _makam_metadata(tmp_path: Path) -> dict[str, list[str]]:
    split = read_split(DEFAULT_SPLITS_ROOT / "makam")
    return {recording: ["usul:aksak" if i % 2 else "makam:hicaz"] for i, recording in enumerate(
        recording for ids in split.ids.values() for recording in ids
    )}  # fmt: skip


def test_user_metadata_reads_from_json_csv_and_tsv_and_a_pickle_only_when_trusted(tmp_path):
    metadata = _makam_metadata(tmp_path)
    (tmp_path / "m.json").write_text(json.dumps(metadata))
    for name, delimiter in (("m.csv", ","), ("m.tsv", "\t")):
        with (tmp_path / name).open("w", newline="") as handle:
            csv.writer(handle, delimiter=delimiter).writerows(
                [("id", "tags"), *((k, "|".join(v)) for k, v in metadata.items())]
            )
    tasks = [load_task("makam", metadata=tmp_path / name) for name in ("m.json", "m.csv", "m.tsv")]
    assert len({task.checksum() for task in tasks}) == 1
    assert tasks[0].tags == ["makam:hicaz", "usul:aksak"]

    marker = tmp_path / "code-ran"
    np.save(tmp_path / "m.npy", np.array({**metadata, "x": Plant(marker)}, dtype=object), allow_pickle=True)
    with pytest.raises(TaskError, match=r"m\.npy: a \.npy metadata dict is a pickle.*--trust-pickle"):
        load_task("makam", metadata=tmp_path / "m.npy")
    assert not marker.exists()
    np.save(tmp_path / "trusted.npy", np.array(metadata, dtype=object), allow_pickle=True)
    assert (
        load_task("makam", metadata=tmp_path / "trusted.npy", trust_pickle=True).checksum()
        == tasks[0].checksum()
    )


# --- No evaluation leak (issue 10 item 6).


def test_the_lyra_carve_is_the_committed_list_made_by_the_seeded_procedure():
    with (DEFAULT_SPLITS_ROOT / "lyra" / "training.tsv").open(newline="") as handle:
        training = [row["id"] for row in csv.DictReader(handle, delimiter="\t")]
    shipped = (DEFAULT_SPLITS_ROOT / "lyra" / "valid.txt").read_text().split()
    assert len(shipped) == 124 and set(shipped) == lyra_valid_carve(training)
    lyra = load_task("lyra")
    assert sorted(lyra.ids[row] for row in lyra.rows("valid")) == sorted(shipped)


@pytest.mark.parametrize("dataset", ["makam", "lyra"])
def test_an_evaluation_id_in_other_case_and_extension_is_refused(dataset, tmp_path):
    split = read_split(DEFAULT_SPLITS_ROOT / dataset)
    leaked = split.ids["test" if dataset == "makam" else "valid"][0]  # lyra: an id of the carve
    culture = tmp_path / "culture"
    noise(culture / "fine.wav", 0)
    noise(culture / f"{leaked.upper()}.FLAC", 1)

    message = refused(makam_run(culture, tmp_path / "out"))

    label = "makam test" if dataset == "makam" else "lyra valid"
    assert str(culture / f"{leaked.upper()}.FLAC") in message and label in message and "refusing" in message
    assert not (tmp_path / "out").exists()


# --- Content, not size (issue 11 item 3).


def test_a_recording_replaced_by_other_audio_of_the_same_length_is_cut_again(tmp_path):
    culture, out = tmp_path / "culture", tmp_path / "out"
    noise(culture / "a.wav", 0)
    noise(culture / "b.wav", 1)
    assert makam_run(culture, out).returncode == 0
    audio = out / "makam" / "audio" / "makam"
    kept = {path.name: path.stat().st_mtime_ns for path in audio.glob("b_*.flac")}

    replacement = noise(culture / "a.wav", 2)
    result = makam_run(culture, out)

    assert result.returncode == 0, result.stderr
    provenance = json.loads((out / "makam" / "provenance.json").read_text())
    assert provenance["recordings_recut"] == ["makam/a"] and provenance["segments_written"] == 2
    assert {path.name: path.stat().st_mtime_ns for path in audio.glob("b_*.flac")} == kept
    segment, _ = sf.read(audio / "a_0000.flac", dtype="float32")
    np.testing.assert_allclose(segment, replacement[: 30 * SAMPLE_RATE], atol=1 / 32768)


# --- Audio (issue 11 items 7, 8).


def test_clipped_samples_are_counted_and_written_at_full_scale(tmp_path):
    culture, out = tmp_path / "culture", tmp_path / "out"
    noise(culture / "quiet.wav", 0)
    loud = noise(culture / "loud.wav", 1, scale=0.8, subtype="FLOAT")  # float WAV, 24 kHz: no resampling

    result = makam_run(culture, out)

    assert result.returncode == 0, result.stderr
    expected = int(np.count_nonzero(np.abs(loud[: 35 * SAMPLE_RATE]) > 1))
    assert expected > 1000
    provenance = json.loads((out / "makam" / "provenance.json").read_text())
    assert provenance["samples_clipped"] == {"makam/loud": expected}
    assert f"clipped {expected} samples beyond full scale in 1 recording(s)" in result.stderr
    segment, _ = sf.read(out / "makam" / "audio" / "makam" / "loud_0000.flac", dtype="float32")
    np.testing.assert_allclose(segment, np.clip(loud[: 30 * SAMPLE_RATE], -1, 1), atol=1 / 32768)


def _truncated_flac(path: Path) -> None:
    noise(path, 3, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header still promises 35 s


@pytest.mark.parametrize(
    "name, write, problem",
    [
        (
            "broken.wav",
            lambda path: path.write_bytes(b"RIFF not really a wave file"),
            "not readable as audio",
        ),
        ("cut.flac", _truncated_flac, "corrupt"),  # found only while decoding, after planning
    ],
)
def test_an_unreadable_recording_is_one_line_or_a_counted_skip_when_asked(name, write, problem, tmp_path):
    culture = tmp_path / "culture"
    noise(culture / "a.wav", 0)
    noise(culture / "b.wav", 1)
    write(culture / name)

    message = refused(makam_run(culture, tmp_path / "refused"))
    assert message.startswith(f"prepare_data: {culture / name}: ") and problem in message
    assert not list(tmp_path.glob("refused/**/*.tsv")) and not list(
        tmp_path.glob("refused/**/provenance.json")
    )

    result = makam_run(culture, tmp_path / "out", "--skip-unreadable")
    assert result.returncode == 0, result.stderr
    assert "makam: skipped 1 unreadable recording(s)" in result.stderr
    out = tmp_path / "out" / "makam"
    source = json.loads((out / "provenance.json").read_text())["sources"]["makam"]
    assert source["recordings"] == 2 and len(source["unreadable_skipped"]) == 1
    assert source["unreadable_skipped"][0].startswith(f"{culture / name}: ")
    listed = {name for stage in ("stage1", "stage2") for split in ("train", "valid")
              for name in read_manifest(out / stage / f"{split}.tsv").files}  # fmt: skip
    assert {entry.split("/")[1].rsplit("_", 1)[0] for entry in listed} == {"a", "b"}
    for entry in listed:
        assert sf.info(out / "audio" / entry).frames in (30 * SAMPLE_RATE, 5 * SAMPLE_RATE)


def test_segments_decoded_in_blocks_equal_the_whole_file_decoded_at_once(tmp_path):
    culture, out = tmp_path / "culture", tmp_path / "out"
    rate = 44_100
    stereo = 0.3 * np.random.default_rng(0).standard_normal((65 * rate, 2))
    culture.mkdir()
    sf.write(culture / "long.wav", stereo, rate, subtype="PCM_16")
    noise(culture / "other.wav", 1)

    assert makam_run(culture, out).returncode == 0
    whole = load_audio(culture / "long.wav")
    for index, start in enumerate(range(0, 60 * SAMPLE_RATE, 30 * SAMPLE_RATE)):
        segment, _ = sf.read(out / "makam" / "audio" / "makam" / f"long_{index:04d}.flac", dtype="float32")
        np.testing.assert_allclose(
            segment, np.clip(whole[start : start + 30 * SAMPLE_RATE], -1, 1), atol=1e-4
        )


# --- Duplicates and dropped tags (issue 11 item 11).


def test_a_manifest_listing_a_file_twice_is_refused_by_line(tmp_path):
    manifest = tmp_path / "train.tsv"
    manifest.write_text(f"{tmp_path}\na.flac\t100\nb.flac\t100\na.flac\t100\n")
    with pytest.raises(ManifestError, match=r"train\.tsv:4: 'a\.flac' is listed again \(first on line 2\)"):
        read_manifest(manifest)


def test_tags_only_outside_the_training_split_are_named_in_the_log(tmp_path, caplog):
    task_file = tmp_path / "task.csv"
    task_file.write_text("a.wav,train,rock\nb.wav,train,rock|jazz\nc.wav,valid,jazz|polka\nd.wav,test,zouk\n")
    with caplog.at_level(logging.WARNING):
        task = load_csv_task(task_file)
    assert task.tags == ["rock", "jazz"]
    assert "task: 2 tag(s) occur only outside the training split and are left out: polka, zouk" in caplog.text


# --- One audio-file finder (issue 12 item 3).


def test_probing_finds_a_recording_with_any_audio_extension(tmp_path):
    task_file = tmp_path / "task.csv"
    task_file.write_text("x/a.wav,train,rock\nb.opus,test,rock\nc.aiff,valid,rock\n")
    audio = tmp_path / "audio"
    for name in ("deep/a.WAV", "b.opus", "c.aiff"):
        (audio / name).parent.mkdir(parents=True, exist_ok=True)
        (audio / name).write_bytes(b"")
    found = find_audio(load_csv_task(task_file), audio)
    assert found == [audio / "deep" / "a.WAV", audio / "b.opus", audio / "c.aiff"]


def test_a_rerun_killed_while_cutting_leaves_no_complete_looking_output_and_resumes(tmp_path, monkeypatch):
    from culturemert.cli.prepare_data import main
    from culturemert.data import writing

    culture, out = tmp_path / "culture", tmp_path / "out"
    for seed, name in enumerate("abc"):
        noise(culture / f"{name}.wav", seed)
    assert makam_run(culture, out).returncode == 0
    before = {path: path.read_bytes() for path in (out / "makam").rglob("*.tsv")}
    noise(culture / "a.wav", 10)  # changed: its segments are cut again
    noise(culture / "c.wav", 12)
    args = [
        "--run",
        "makam",
        "--culture",
        f"makam={culture}",
        "--split",
        f"makam={culture.with_name('split.csv')}",
    ]
    args += ["--replay-share", "0", "--stage1-hours", "1", "--stage2-hours", "1", "--out", str(out)]
    cut_recording = writing.cut_recording

    def killed_on_the_second(recording, segments, audio_out):
        if recording.id == "c":
            raise KeyboardInterrupt
        return cut_recording(recording, segments, audio_out)

    monkeypatch.setattr(writing, "cut_recording", killed_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert not (out / "makam" / "provenance.json").exists() and not list((out / "makam").rglob("*.tsv"))

    monkeypatch.setattr(writing, "cut_recording", cut_recording)
    assert main(args) == 0
    provenance = json.loads((out / "makam" / "provenance.json").read_text())
    # a was re-cut before the kill; c's record went before its cut began, so both its segments
    # are cut again (from the new content), and nothing else.
    assert provenance["segments_written"] == 2 and provenance["recordings_recut"] == []
    assert {path: path.read_bytes() for path in (out / "makam").rglob("*.tsv")} == before
    for name, seed in (("a", 10), ("c", 12)):
        segment, _ = sf.read(out / "makam" / "audio" / "makam" / f"{name}_0000.flac", dtype="float32")
        np.testing.assert_array_equal(segment, noise(tmp_path / "again.wav", seed)[: 30 * SAMPLE_RATE])
