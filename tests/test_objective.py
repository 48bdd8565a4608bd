"""The MERT objective: criterion against a hand computation, noise mixture, crops, CQT targets."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import tiny_config
from music21 import corpus

from culturemert.audio import HOP_LENGTH, AudioError, load_audio
from culturemert.criterions.mert_mlm import MertMlmConfig, MertMlmCriterion
from culturemert.data.crops import CropDataset
from culturemert.data.manifest import read_manifest, write_manifest
from culturemert.data.noise_mixture import NoiseMixture
from culturemert.models.mert import MertModel
from culturemert.music_corpus import synthesize
from culturemert.targets.cqt import CQTSettings, CQTTeacher, nnaudio_cqt


def fixed_batch(frames: int = 74, samples: int = 24_000, batch: int = 2) -> dict:
    generator = torch.Generator().manual_seed(1)
    return {
        "net_input": {"source": torch.randn(batch, samples, generator=generator), "padding_mask": None},
        "codes": torch.randint(0, 1024, (batch, frames + 1, 8), generator=generator),
        "cqt": torch.rand(batch, frames + 2, 336, generator=generator),
    }


def hand_loss(model: MertModel, sample: dict, alpha: float, beta: float, codebooks: list[int]) -> float:
    """The objective written frame by frame with explicit cosines and log-softmaxes."""
    torch.manual_seed(7)
    out = model(**sample["net_input"], mask=True)
    total = 0.0
    cfg = model.cfg
    blocks = model.label_embs_concat.view(cfg.num_codebooks, cfg.codeword_rows, cfg.final_dim)
    for b, t in out["mask_indices"].nonzero().tolist():
        h = out["x"][b, t]
        projected = model.final_proj(h).view(cfg.num_codebooks, cfg.final_dim)
        for k in codebooks:
            cosines = torch.nn.functional.cosine_similarity(projected[k][None], blocks[k], dim=1)
            log_probs = torch.log_softmax(cosines / 0.1, dim=0)
            total -= alpha * log_probs[sample["codes"][b, t, k] + 4].item()
        error = model.encoder_cqt_model.fc(h) - sample["cqt"][b, t]
        total += beta * error.pow(2).mean().item()
    return total


def test_criterion_equals_hand_computation(seeded):
    model = MertModel(tiny_config()).eval()
    sample = fixed_batch()
    criterion = MertMlmCriterion(MertMlmConfig(), task=None)
    torch.manual_seed(7)
    loss, sample_size, logs = criterion(model, sample)
    expected = hand_loss(model, sample, alpha=10.0, beta=1.0, codebooks=list(range(8)))
    assert sample_size == logs["sample_size"] > 0
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert logs["loss_acoustic"] * 10 + logs["loss_cqt"] == pytest.approx(expected, rel=1e-5)
    assert sum(logs[f"loss_codebook_{k}"] for k in range(8)) == pytest.approx(logs["loss_acoustic"], rel=1e-6)


def test_release_weights_and_random_codebook_subset(seeded):
    model = MertModel(tiny_config()).eval()
    sample = fixed_batch()
    cfg = MertMlmConfig(
        acoustic_weight=1.0, musical_weight=1.0, feature_penalty_weight=10.0, codebooks_per_batch=4
    )
    criterion = MertMlmCriterion(cfg, task=None)
    torch.manual_seed(7)
    loss, sample_size, logs = criterion(model, sample)
    chosen = sorted(int(key.rsplit("_", 1)[1]) for key in logs if key.startswith("loss_codebook_"))
    assert len(chosen) == 4
    torch.manual_seed(7)
    penalty = model(**sample["net_input"], mask=True)["features_pen"].item() * sample_size
    # The subset is drawn after the mask, from the same RNG stream: recompute with that subset.
    expected = hand_loss(model, sample, alpha=1.0, beta=1.0, codebooks=chosen) + 10.0 * penalty
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_noise_mixture_probability_zero_is_identity():
    source = torch.randn(4, 48_000)
    assert torch.equal(NoiseMixture(prob=0.0)(source), source)


def test_noise_mixture_adds_segments_of_other_clips(seeded):
    # Integer-valued samples keep the sums exact, so each added segment can be found verbatim.
    clips = torch.randint(-1000, 1000, (3, 48_000)).float()
    mixture = NoiseMixture(prob=1.0, max_segments=1, min_length=12_000, max_length=24_000)
    mixed = mixture(clips)
    for i in range(3):
        added = (mixed[i] - clips[i]).nonzero().flatten()
        start, length = int(added[0]), int(added[-1]) - int(added[0]) + 1
        assert 12_000 <= length <= 24_000
        segment = (mixed[i, start : start + length] - clips[i, start : start + length]).numpy()
        found = [
            (j, s)
            for j in range(3)
            for s in np.flatnonzero(clips[j].numpy() == segment[0])
            if np.array_equal(clips[j, s : s + length].numpy(), segment)
        ]
        assert found and all(j != i for j, _ in found), f"clip {i}: not a segment of another clip"


def test_noise_mixture_never_touches_padding(seeded):
    clips = torch.randn(4, 48_000)
    padding = torch.zeros(4, 48_000, dtype=torch.bool)
    padding[2, 30_000:] = True
    clips[2, 30_000:] = 0
    mixed = NoiseMixture(prob=1.0)(clips, padding)
    assert not mixed[2, 30_000:].any()


def test_cqt_targets_align_with_model_frames():
    teacher = CQTTeacher()
    wav = torch.randn(1, 120_000)
    cqt = teacher(wav)
    assert cqt.shape == (1, 376, 336)  # centred frames: 120000 // 320 + 1
    assert cqt.dtype == torch.float32 and (cqt >= 0).all()
    # A pure tone peaks in the bin of its pitch: bin = 48 * log2(f / 32.7).
    t = torch.arange(48_000) / 24_000
    tone = torch.sin(2 * torch.pi * 440.0 * t)[None]
    peak = teacher(tone)[0, 20:-20].mean(dim=0).argmax().item()
    assert abs(peak - 48 * np.log2(440.0 / 32.7)) <= 1


@pytest.mark.parametrize("seconds", [1.0, 5.0])
def test_cqt_teacher_equals_nnaudio(seconds):
    """The grouped convolution gives nnAudio's CQT (thesis eq. 3.3) up to float rounding, on real
    music (a rendered Bach chorale with silence after it) and on white noise."""
    samples = int(seconds * 24_000)
    chorale = torch.zeros(samples)
    music = torch.from_numpy(synthesize(corpus.parse("bach/bwv66.6"), max_seconds=seconds * 0.7))
    chorale[: len(music)] = music
    wav = torch.stack([chorale, torch.randn(samples, generator=torch.Generator().manual_seed(0))])
    ours = CQTTeacher()(wav)
    reference = nnaudio_cqt(CQTSettings())(wav).transpose(1, 2)
    assert ours.shape == reference.shape == (2, samples // 320 + 1, 336)
    assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.fixture
def clips(tmp_path):
    """Four 24 kHz WAVs of different lengths and their manifest."""
    rng = np.random.default_rng(0)
    lengths = [72_000, 130_000, 200_000, 50_000]
    entries = []
    for i, n in enumerate(lengths):
        sf.write(
            tmp_path / f"clip{i}.wav", rng.uniform(-0.5, 0.5, n).astype(np.float32), 24_000, subtype="FLOAT"
        )
        entries.append((f"clip{i}.wav", n))
    write_manifest(tmp_path / "train.tsv", tmp_path, entries)
    return read_manifest(tmp_path / "train.tsv")


def test_crops_are_frame_aligned_slices_and_short_clips_are_dropped(clips, caplog):
    with caplog.at_level(logging.INFO):
        dataset = CropDataset(clips, crop_samples=120_000, min_samples=72_000, seed=3)
    assert "dropped 1 of 4 clips shorter than 72000 samples" in caplog.text
    assert len(dataset) == 3
    for epoch in (1, 2):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            item = dataset[index]
            row = dataset.rows[index]
            full = load_audio(clips.audio_path(row))
            start = dataset.crop_start_frame(index) * HOP_LENGTH
            assert len(item["source"]) == min(len(full), 120_000)
            assert torch.equal(item["source"], torch.from_numpy(full[start : start + len(item["source"])]))
    batch = dataset.collater([dataset[i] for i in range(3)])
    source, padding = batch["net_input"]["source"], batch["net_input"]["padding_mask"]
    assert source.shape == (3, 120_000)
    assert padding[0, 72_000:].all() and not padding[0, :72_000].any() and not padding[1:].any()
    assert not source[0, 72_000:].any()


def test_crop_positions_repeat_for_the_same_seed_and_epoch(clips):
    first = CropDataset(clips, 120_000, 72_000, seed=3)
    again = CropDataset(clips, 120_000, 72_000, seed=3)
    first.set_epoch(5)
    again.set_epoch(5)
    assert [first.crop_start_frame(i) for i in range(3)] == [again.crop_start_frame(i) for i in range(3)]


def test_bad_clips_fail_loudly_or_are_skipped_and_counted(clips, tmp_path):
    (tmp_path / "clip2.wav").write_text("not audio")
    dataset = CropDataset(clips, 120_000, 72_000)
    with pytest.raises(AudioError, match="clip2.wav"):
        dataset[2]
    skipping = CropDataset(clips, 120_000, 72_000, skip_bad_audio=True)
    batch = skipping.collater([skipping[i] for i in range(3)])
    assert batch["skipped"] == 1 and len(batch["id"]) == 2


def test_manifest_rate_and_length_errors_name_the_file(tmp_path):
    sf.write(tmp_path / "a.wav", np.zeros(80_000, np.float32), 44_100)
    write_manifest(tmp_path / "train.tsv", tmp_path, [("a.wav", 80_000)])
    dataset = CropDataset(read_manifest(tmp_path / "train.tsv"), 24_000, 24_000)
    with pytest.raises(AudioError, match=r"a.wav: sample rate is 44100 Hz.*run data preparation"):
        dataset[0]
    sf.write(tmp_path / "b.wav", np.zeros(30_000, np.float32), 24_000)
    write_manifest(tmp_path / "long.tsv", tmp_path, [("b.wav", 90_000)])  # the manifest overstates it
    dataset = CropDataset(read_manifest(tmp_path / "long.tsv"), 120_000, 72_000)
    with pytest.raises(AudioError, match="b.wav: crop .* runs past the end"):
        dataset[0]


def test_task_targets_come_from_the_clean_audio_and_only_the_input_is_mixed(tmp_path, seeded):
    """mert_cpt.add_targets: CQT and on-the-fly EnCodec codes of the clean crops, noise mixture on
    the model input only (training), nothing mixed for validation."""
    from culturemert.targets.encodec_teacher import EncodecTeacher
    from culturemert.tasks.mert_cpt import MertCptConfig, MertCptTask

    teacher = EncodecTeacher.from_data(torch.randn(1, 20 * 24_000) * 0.1, seed=0)
    teacher.save(tmp_path / "teacher.th")
    task = MertCptTask(
        MertCptConfig(data="unused", encodec_checkpoint=str(tmp_path / "teacher.th"), mixup_prob=1.0)
    )
    clean = torch.randn(3, 24_000) * 0.1
    sample = task.add_targets({"net_input": {"source": clean.clone(), "padding_mask": None}}, mix=True)
    assert not torch.equal(sample["net_input"]["source"], clean)
    assert torch.equal(sample["cqt"], CQTTeacher()(clean))
    assert torch.equal(sample["codes"], teacher.codes(clean))
    valid = task.add_targets({"net_input": {"source": clean.clone(), "padding_mask": None}}, mix=False)
    assert torch.equal(valid["net_input"]["source"], clean)
