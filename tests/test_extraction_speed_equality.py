"""The fast feature-extraction path (culturemert.models.extractor, MertModel.inference_states)
against independent implementations: fairseq's convolutions, transformers' HubertModel at the real
MERT-v1-95M size, and the features `probe.py extract` writes against HubertModel's mean-pooled
hidden states."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import tiny_config
from transformers import HubertModel

from culturemert.audio import SAMPLE_RATE
from culturemert.checkpoint import convert, load_model, save_fairseq
from culturemert.cli import run as run_cli
from culturemert.cli.probe import main as probe_main
from culturemert.models.extractor import TILE_FRAMES, extractor_features
from culturemert.models.mert import MertConfig, MertModel
from culturemert.probing.chunking import chunk_bounds
from culturemert.probing.precision import PRECISIONS, computation

pytestmark = pytest.mark.usefixtures("one_thread")


def hubert_pair(cfg: MertConfig, folder: Path, seed: int = 0) -> tuple[MertModel, HubertModel]:
    """A randomly initialised model of ``cfg`` loaded by this project and by transformers."""
    torch.manual_seed(seed)
    save_fairseq(folder / "model.pt", cfg, MertModel(cfg).state_dict())
    convert(folder / "model.pt", folder / "hf")
    return load_model(folder / "model.pt"), HubertModel.from_pretrained(folder / "hf").eval()


@pytest.mark.parametrize("threads", [1, 2], ids=["tiles", "whole-clip"])
@pytest.mark.parametrize("conv_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("samples", [401, 3 * SAMPLE_RATE + 137], ids=["one-frame", "several-tiles"])
def test_tiled_extractor_equals_fairseqs_convolutions(threads, conv_bias, samples, seeded):
    """On one thread in tiles of `TILE_FRAMES`, on several as one tile."""
    model = MertModel(tiny_config(conv_bias=conv_bias)).eval()
    wav = torch.randn(2, samples) * torch.tensor([[0.1], [2.0]])
    torch.set_num_threads(threads)  # the one_thread fixture restores the count
    with torch.inference_mode():
        fast = extractor_features(model.feature_extractor, wav)
        reference = model.feature_extractor(wav).transpose(1, 2)
    assert fast.shape == reference.shape
    if samples > 401:
        assert fast.shape[1] > 3 * TILE_FRAMES and fast.shape[1] % TILE_FRAMES != 0
    assert (fast - reference).abs().max() < 1e-5


def test_inference_states_at_the_real_size_equal_transformers_hubert(tmp_path):
    """All 13 hidden states of MERT-v1-95M on two 6 s clips, several conv tiles each."""
    ours, theirs = hubert_pair(MertConfig(), tmp_path)
    wav = torch.randn(2, 6 * SAMPLE_RATE) * torch.tensor([[0.05], [1.0]])
    with torch.inference_mode():
        fast = ours.hidden_states(wav)
        reference = theirs(wav, output_hidden_states=True).hidden_states
    assert len(fast) == len(reference) == 13
    for layer, (mine, hubert) in enumerate(zip(fast, reference)):
        assert mine.shape == hubert.shape == (2, 449, 768)
        error = (mine - hubert).abs().max().item()
        assert error < 1e-4, f"hidden state {layer} differs by {error}"


def test_probe_extract_writes_the_mean_pooled_states_of_transformers_hubert(tmp_path):
    """Through ``probe.py extract``: every chunk's features are HubertModel's hidden states of that
    chunk averaged over its frames, to float16 precision."""
    ours, theirs = hubert_pair(tiny_config(), tmp_path, seed=4)
    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    clips = {f"clip{index}": rng.normal(0, 0.2, round(seconds * SAMPLE_RATE)).astype(np.float32)
             for index, seconds in enumerate([2.5, 1.0, 3.2])}  # fmt: skip
    with (tmp_path / "task.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "split", "tags"])
        for index, (name, wave) in enumerate(clips.items()):
            sf.write(audio / f"{name}.wav", wave, SAMPLE_RATE, subtype="FLOAT")
            writer.writerow([f"{name}.wav", ("train", "valid", "test")[index], "a" if index % 2 else "b"])
    out = tmp_path / "features"
    argv = ["extract", "--model", str(tmp_path / "model.pt"), "--task", str(tmp_path / "task.csv")]
    argv += ["--audio-root", str(audio), "--out", str(out), "--window-seconds", "1", "--no-progress"]
    assert run_cli(probe_main, "probe", argv) == 0

    expected = []
    with torch.inference_mode():
        for wave in clips.values():
            for start, stop in chunk_bounds(len(wave), window_seconds=1):
                states = theirs(
                    torch.from_numpy(wave[None, start:stop]), output_hidden_states=True
                ).hidden_states
                expected.append(torch.stack([state[0].mean(dim=0) for state in states]).numpy())
    written = np.load(out / "features.npy").astype(np.float32)
    assert written.shape == (len(expected), 3, 64)
    np.testing.assert_allclose(written, np.stack(expected), rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_states_in_each_precision_against_the_cpus_float32(tmp_path):
    """MERT-v1-95M on CUDA: float32 (TF32 off) equals the CPU's states within 1e-4; under bfloat16
    and float16 autocast the mean-pooled states, the probe's features, stay within 3 % of their
    layer's largest value and are finite."""
    model, _ = hubert_pair(MertConfig(), tmp_path)
    wav = torch.randn(2, 6 * SAMPLE_RATE) * torch.tensor([[0.05], [1.0]])
    with computation("float32", "cpu"):
        reference = model.hidden_states(wav)
    model.cuda()
    for precision in PRECISIONS:
        with computation(precision, "cuda"):
            states = [state.float().cpu() for state in model.hidden_states(wav.cuda())]
        for layer, (state, expected) in enumerate(zip(states, reference)):
            assert torch.isfinite(state).all(), f"{precision}: hidden state {layer} is not finite"
            if precision == "float32":
                error = (state - expected).abs().max().item()
                assert error < 1e-4, f"float32 hidden state {layer} differs by {error}"
            pooled, expected_pooled = state.mean(dim=1), expected.mean(dim=1)
            relative = ((pooled - expected_pooled).abs().max() / expected_pooled.abs().max()).item()
            assert relative < 3e-2, f"{precision}: pooled hidden state {layer} differs by {relative:.1e}"
