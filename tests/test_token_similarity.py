"""Token-level culture similarity (scripts/token_similarity.py): code histograms of token caches,
Jensen-Shannon divergence and cosine distance averaged over codebooks, and the k-means "semantic
tokens" of one layer's frames."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import tiny_config

from culturemert.checkpoint import save_fairseq
from culturemert.cli import run as run_cli
from culturemert.cli.token_similarity import main as token_similarity_main
from culturemert.data.manifest import write_manifest
from culturemert.models.mert import MertModel, conv_output_lengths
from culturemert.music_corpus import render_collection
from culturemert.probing.token_similarity import code_histograms, pairwise_distances


def token_similarity_cli(argv: list[str]) -> int:
    """The token_similarity command as the entry point runs it: a user error is status 2."""
    return run_cli(token_similarity_main, "token_similarity", argv)


REPO = Path(__file__).resolve().parents[1]
CODEBOOKS, CODES = 8, 1024

pytestmark = pytest.mark.usefixtures("one_thread")


def write_token_cache(folder: Path, codes: np.ndarray, manifest: str = "unused.tsv") -> Path:
    """A complete cache folder in the layout of culturemert.targets.token_cache (one row)."""
    folder.mkdir(parents=True)
    np.save(folder / "codes.npy", codes.astype("<u2"))
    np.save(folder / "offsets.npy", np.array([0, len(codes)], dtype=np.int64))
    meta = {"manifest": manifest, "rows": 1, "num_codebooks": CODEBOOKS, "codebook_size": CODES}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def caches(tmp_path) -> dict[str, Path]:
    """Two caches drawn from one code distribution and one from a narrower distribution."""
    rng = np.random.default_rng(0)
    wide = rng.dirichlet(np.ones(CODES), size=CODEBOOKS)
    narrow = np.zeros_like(wide)
    narrow[:, :64] = rng.dirichlet(np.ones(64), size=CODEBOOKS)

    def draw(distribution: np.ndarray, frames: int) -> np.ndarray:
        return np.stack([rng.choice(CODES, size=frames, p=p) for p in distribution], axis=1)

    return {
        "a": write_token_cache(tmp_path / "a", draw(wide, 20_000)),
        "b": write_token_cache(tmp_path / "b", draw(wide, 30_000)),
        "c": write_token_cache(tmp_path / "c", draw(narrow, 20_000)),
    }


def _kl_bits(p: np.ndarray, q: np.ndarray) -> float:
    support = p > 0
    return float(np.sum(p[support] * np.log2(p[support] / q[support])))


def test_divergences_are_the_codebook_means_of_the_textbook_formulas(caches):
    histograms = [code_histograms(path) for path in caches.values()]
    assert [h.sum(axis=1).tolist() for h in histograms] == [[20_000] * 8, [30_000] * 8, [20_000] * 8]
    matrices = pairwise_distances(histograms)
    js, cos = matrices["js_divergence"], matrices["cosine_distance"]
    expected_js, expected_cos = [], []
    for p, q in zip(histograms[0] / 20_000, histograms[2] / 20_000):
        m = (p + q) / 2
        expected_js.append(0.5 * _kl_bits(p, m) + 0.5 * _kl_bits(q, m))
        expected_cos.append(1 - p @ q / (np.linalg.norm(p) * np.linalg.norm(q)))
    assert js[0, 2] == pytest.approx(np.mean(expected_js)) and cos[0, 2] == pytest.approx(
        np.mean(expected_cos)
    )
    for matrix in (js, cos):
        np.testing.assert_allclose(matrix, matrix.T)
        np.testing.assert_allclose(np.diag(matrix), 0, atol=1e-12)
    assert 0 < js[0, 1] < js[0, 2] <= 1 and cos[0, 1] < cos[0, 2]  # same source is closer


def test_cli_writes_csv_matrices_and_heatmaps(caches, tmp_path, capsys):
    out = tmp_path / "report"
    paths = [str(path) for path in caches.values()]
    args = ["--caches", *paths, "--names", "A", "B", "C", "--out", str(out)]
    assert token_similarity_cli(args) == 0
    for stem in ("js_divergence", "cosine_distance"):
        assert (out / f"{stem}.png").stat().st_size > 0
        with (out / f"{stem}.csv").open() as handle:
            rows = list(csv.reader(handle))
        assert rows[0] == ["", "A", "B", "C"] and [row[0] for row in rows[1:]] == ["A", "B", "C"]
        expected = pairwise_distances([code_histograms(path) for path in caches.values()])[stem]
        np.testing.assert_allclose(np.array([row[1:] for row in rows[1:]], dtype=float), expected, atol=1e-6)
    assert np.load(out / "histograms.npz")["counts"].shape == (3, CODEBOOKS, CODES)

    (caches["c"] / "meta.json").unlink()
    assert token_similarity_cli(["--caches", *paths, "--out", str(out)]) == 2
    assert "no meta.json" in capsys.readouterr().err


def test_semantic_tokens_cluster_one_layer_of_the_caches_audio(tmp_path):
    manifests = []
    for name in ("bach", "fiddle"):
        folder = tmp_path / name
        rendered = render_collection(name, folder, 2, seed=0, max_seconds=3.0)
        entries = [(path.name, sf.info(path).frames) for path, _ in rendered]
        write_manifest(folder / "train.tsv", folder, entries)
        manifests.append((folder / "train.tsv", sum(int(conv_frames(n)) for _, n in entries)))
    caches = [
        write_token_cache(tmp_path / f"cache{i}", np.zeros((4, CODEBOOKS)), str(manifest))
        for i, (manifest, _) in enumerate(manifests)
    ]
    torch.manual_seed(0)
    cfg = tiny_config()
    save_fairseq(tmp_path / "tiny.pt", cfg, MertModel(cfg).state_dict())
    out = tmp_path / "semantic"
    args = ["--semantic", "--model", str(tmp_path / "tiny.pt"), "--layer", "1", "--k", "8"]
    args += ["--caches", *map(str, caches), "--names", "bach", "fiddle", "--out", str(out)]
    assert token_similarity_cli(args) == 0
    counts = np.load(out / "semantic_histograms.npz")["counts"]
    assert counts.shape == (2, 1, 8)
    assert counts.sum(axis=(1, 2)).tolist() == [frames for _, frames in manifests]  # every frame assigned
    assert (out / "semantic_js_divergence.png").is_file() and (out / "semantic_cosine_distance.csv").is_file()


def conv_frames(num_samples: int) -> int:
    """Frames the tiny model gives a clip of `num_samples`."""
    return int(conv_output_lengths(torch.tensor([num_samples]), tiny_config().conv_layers)[0])
