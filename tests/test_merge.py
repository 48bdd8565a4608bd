"""Model merging (thesis 3.4, 4.4): task arithmetic, TIES and DARE against hand
computations, streamed inputs in both formats, refusals, similarity and the CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from fairseq import checkpoint_utils

from culturemert import load_model
from culturemert.checkpoint import CheckpointError, save_fairseq, save_hf
from culturemert.hf_format import HEAD_PREFIXES
from culturemert.merging import (
    MagnitudeThresholds,
    analyse,
    dare,
    merge,
    open_source,
    plan_merge,
    ties,
    write_merged,
    write_similarity,
)
from culturemert.models.mert import MertModel

REPO = Path(__file__).resolve().parents[1]

# Three task vectors of four parameters, no ties among the two largest magnitudes of each.
HAND_TAUS = torch.tensor(
    [
        [0.5, -0.1, 0.3, -0.4],
        [-0.2, 0.25, 0.6, 0.1],
        [0.3, 0.05, -0.7, -0.35],
    ]
)
# TIES by hand, keeping 2 of 4 per task vector:
#   trimmed  [0.5, 0, 0, -0.4], [0, 0.25, 0.6, 0], [0, 0, -0.7, -0.35]
#   sums     [0.5, 0.25, -0.1, -0.75] -> elected signs [+, +, -, -]
#   agreeing [0.5], [0.25], [-0.7], [-0.4, -0.35] -> disjoint means:
HAND_TIES = torch.tensor([0.5, 0.25, -0.7, -0.375])

pytestmark = pytest.mark.usefixtures("one_thread")


def write_models(folder: Path, count: int, cfg=None, scale: float = 0.01):
    """A base and ``count`` adapted models (base + independent Gaussian task vectors) as .pt files."""
    torch.manual_seed(0)
    cfg = cfg or tiny_config()
    base = MertModel(cfg).state_dict()
    save_fairseq(folder / "base.pt", cfg, base)
    models = []
    for i in range(count):
        models.append({k: v + scale * torch.randn_like(v) for k, v in base.items()})
        save_fairseq(folder / f"m{i}.pt", cfg, models[-1])
    return cfg, base, models, [folder / f"m{i}.pt" for i in range(count)]


def plan_for(folder: Path, paths, **options):
    return plan_merge(open_source(folder / "base.pt"), [open_source(p) for p in paths], **options)


def test_task_arithmetic_is_the_thesis_formula_and_loads(tmp_path):
    cfg, base, models, paths = write_models(tmp_path, 3)
    lambdas = [0.3, -0.5, 1.2]
    state = merge(plan_for(tmp_path, paths), lambdas)
    assert list(state) == list(base)
    for key, value in base.items():
        expected = value + sum(lam * (model[key] - value) for lam, model in zip(lambdas, models))
        torch.testing.assert_close(state[key], expected, rtol=0, atol=1e-6)

    write_merged(tmp_path / "out", cfg, state, {"method": "task_arithmetic"})
    loaded = load_model(tmp_path / "out" / "checkpoint.pt").state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    fairseq_view = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "out" / "checkpoint.pt"))
    assert fairseq_view["cfg"]["model"]["_name"] == "mert"
    assert json.loads((tmp_path / "out" / "merge.json").read_text()) == {"method": "task_arithmetic"}


def test_lambda_one_over_n_is_weight_averaging(tmp_path):
    _, base, models, paths = write_models(tmp_path, 4)
    state = merge(plan_for(tmp_path, paths), [0.25] * 4)
    for key in base:
        average = sum(model[key] for model in models) / 4
        torch.testing.assert_close(state[key], average, rtol=0, atol=1e-6)


def two_passes(pieces: list[torch.Tensor], ks: list[int]) -> torch.Tensor:
    """``MagnitudeThresholds`` over a task-vector stack seen in ``pieces``."""
    selection = MagnitudeThresholds(ks)
    for piece in pieces:
        selection.add(piece)
    selection.end_first_pass()
    for piece in pieces:
        selection.add(piece)
    return selection.thresholds()


def test_ties_equals_the_hand_computation():
    thresholds = two_passes([HAND_TAUS[:, :3], HAND_TAUS[:, 3:]], [2, 2, 2])
    torch.testing.assert_close(thresholds, torch.tensor([0.4, 0.25, 0.35]))
    torch.testing.assert_close(ties(HAND_TAUS, [1.0] * 3, thresholds), HAND_TIES)
    torch.testing.assert_close(ties(HAND_TAUS, [0.5] * 3, thresholds), 0.5 * HAND_TIES)


def test_ties_merge_of_whole_models_equals_the_hand_computation(tmp_path):
    cfg = tiny_config()
    base = MertModel(cfg).state_dict()
    save_fairseq(tmp_path / "base.pt", cfg, base)
    for i, tau in enumerate(HAND_TAUS):
        model = dict(base)
        model["mask_emb"] = base["mask_emb"].clone()
        model["mask_emb"][:4] += tau
        save_fairseq(tmp_path / f"m{i}.pt", cfg, model)
    plan = plan_for(tmp_path, [tmp_path / f"m{i}.pt" for i in range(3)])
    total = sum(base[name].numel() for name in plan.merged)
    stats = analyse(plan, trim_density=2 / total)  # keep 2 entries of each whole task vector
    state = merge(plan, [1.0] * 3, "ties", thresholds=stats.thresholds)
    torch.testing.assert_close(state["mask_emb"][:4] - base["mask_emb"][:4], HAND_TIES)
    assert all(torch.equal(state[k], base[k]) for k in base if k != "mask_emb")
    assert torch.equal(state["mask_emb"][4:], base["mask_emb"][4:])


def test_magnitude_thresholds_are_the_kth_largest_magnitude():
    torch.manual_seed(0)
    values = torch.cat([torch.randn(2, 5000), torch.zeros(2, 300), torch.full((2, 200), 0.5)], dim=1)
    values = values[:, torch.randperm(values.shape[1])]
    for k in (0, 1, 250, 5500):
        expected = (
            values.abs().sort(dim=1, descending=True).values[:, k - 1] if k else torch.full((2,), torch.inf)
        )
        assert torch.equal(two_passes(list(values.split(777, dim=1)), [k, k]), expected), k


def test_dare_at_density_one_is_task_arithmetic(tmp_path):
    _, _, _, paths = write_models(tmp_path, 3)
    plan = plan_for(tmp_path, paths)
    arithmetic = merge(plan, [0.2] * 3)
    dropped = merge(plan, [0.2] * 3, "dare", density=1.0, seed=7)
    assert all(torch.equal(dropped[k], arithmetic[k]) for k in arithmetic)


def test_dare_drops_rescales_and_is_seeded(tmp_path):
    taus = torch.randn(2, 100_000)
    update = dare(taus, [1.0, 0.0], 0.25, torch.Generator().manual_seed(0))
    kept = update != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.01
    torch.testing.assert_close(update[kept], taus[0][kept] / 0.25)

    _, _, _, paths = write_models(tmp_path, 2)
    plan = plan_for(tmp_path, paths)
    first, again = merge(plan, [0.5] * 2, "dare", 0.3, seed=1), merge(plan, [0.5] * 2, "dare", 0.3, seed=1)
    other = merge(plan, [0.5] * 2, "dare", 0.3, seed=2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["encoder.layers.0.fc1.weight"], other["encoder.layers.0.fc1.weight"])


def test_merged_hf_folder_loads_in_stock_transformers(tmp_path):
    from transformers import HubertModel

    cfg, _, _, paths = write_models(tmp_path, 2)
    state = merge(plan_for(tmp_path, paths), [0.2, 0.2])
    write_merged(tmp_path / "out", cfg, state, {})
    hubert, info = HubertModel.from_pretrained(tmp_path / "out" / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(
        hubert.encoder.layers[1].feed_forward.output_dense.weight, state["encoder.layers.1.fc2.weight"]
    )


def test_similarity_is_the_cosine_of_the_task_vectors(tmp_path):
    _, base, models, paths = write_models(tmp_path, 3)
    models[2] = {k: v + 0.5 * (models[0][k] - base[k]) for k, v in models[2].items()}  # correlated
    save_fairseq(tmp_path / "m2.pt", tiny_config(), models[2])
    stats = analyse(plan_for(tmp_path, paths))

    def flat(i, keys):
        return torch.cat([(models[i][k] - base[k]).flatten().double() for k in keys])

    layer1 = [k for k in base if k.startswith("encoder.layers.1.")]
    for s, keys in ((0, list(base)), (2, layer1)):
        for i in range(3):
            for j in range(3):
                direct = torch.nn.functional.cosine_similarity(flat(i, keys), flat(j, keys), dim=0)
                torch.testing.assert_close(stats.cosine()[s, i, j], direct, rtol=0, atol=1e-5)
    assert stats.cosine()[0, 0, 2] > 0.3

    csv_path, png_path = write_similarity(stats, tmp_path / "sim")
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["scope"] for r in rows[::3]] == ["model", "layer 0", "layer 1"]
    assert (rows[1]["model_a"], rows[1]["model_b"]) == ("m0", "m2")
    assert png_path.stat().st_size > 0


def test_norm_warning_when_one_task_vector_is_10x_larger(tmp_path):
    _, base, models, paths = write_models(tmp_path, 2)
    assert analyse(plan_for(tmp_path, paths)).norm_warning() is None
    save_fairseq(tmp_path / "m1.pt", tiny_config(), {k: v + 20 * (models[1][k] - v) for k, v in base.items()})
    warning = analyse(plan_for(tmp_path, paths)).norm_warning()
    assert "more than 10x" in warning and "m1" in warning


def test_bad_models_are_refused_with_every_problem_listed(tmp_path):
    cfg, base, models, paths = write_models(tmp_path, 2)
    bad = dict(models[1])
    del bad["encoder.layers.1.fc1.bias"]
    bad["encoder.layers.0.extra"] = torch.zeros(2)
    bad["post_extract_proj.bias"] = torch.zeros(3)
    bad["encoder.layer_norm.weight"] = bad["encoder.layer_norm.weight"].double()
    save_fairseq(paths[1], cfg, bad)
    with pytest.raises(CheckpointError) as error:
        plan_for(tmp_path, paths)
    text = str(error.value)
    assert "m1.pt: missing keys: encoder.layers.1.fc1.bias" in text
    assert "m1.pt: extra keys: encoder.layers.0.extra" in text
    assert "post_extract_proj.bias has shape (3,), the base (64,)" in text
    assert "encoder.layer_norm.weight is torch.float64, the base torch.float32" in text

    headless = {k: v for k, v in models[1].items() if not k.startswith(HEAD_PREFIXES)}
    save_fairseq(paths[1], cfg, headless)
    with pytest.raises(CheckpointError, match="pass --backbone-only"):
        plan_for(tmp_path, paths)
    assert plan_for(tmp_path, paths, backbone_only=True).backbone_only

    broken = dict(models[1])
    broken["mask_emb"] = broken["mask_emb"].clone()
    broken["mask_emb"][3] = float("nan")
    broken["encoder.layers.0.fc2.bias"] = torch.full_like(broken["encoder.layers.0.fc2.bias"], float("inf"))
    save_fairseq(paths[1], cfg, broken)
    with pytest.raises(CheckpointError) as error:
        analyse(plan_for(tmp_path, paths))
    assert "m1.pt: mask_emb" in str(error.value) and "m1.pt: encoder.layers.0.fc2.bias" in str(error.value)


def test_derived_buffers_and_backbone_only_heads_come_from_the_base(tmp_path):
    cfg, base, models, paths = write_models(tmp_path, 2)
    derived = {"encoder_cqt_model.spec_layer.lenghts": torch.arange(5.0)}  # stored by the release
    save_fairseq(tmp_path / "base.pt", cfg, {**base, **derived})
    save_fairseq(paths[0], cfg, {**models[0], "encoder_cqt_model.spec_layer.lenghts": torch.zeros(5)})
    plan = plan_for(tmp_path, paths, backbone_only=True)
    assert "copied from the base" in plan.notes[0]
    state = merge(plan, [0.5, 0.5])
    assert torch.equal(state["encoder_cqt_model.spec_layer.lenghts"], torch.arange(5.0))
    for key in base:
        if key.startswith(HEAD_PREFIXES):
            assert torch.equal(state[key], base[key]), key
    assert not torch.equal(state["encoder.layers.0.fc1.weight"], base["encoder.layers.0.fc1.weight"])
    write_merged(tmp_path / "out", cfg, state, {})
    load_model(tmp_path / "out" / "checkpoint.pt")


def test_hf_inputs_imply_backbone_only_and_an_hf_base_gets_fresh_heads(tmp_path):
    cfg, base, models, paths = write_models(tmp_path, 2)
    save_hf(tmp_path / "base_hf", cfg, base)
    save_hf(tmp_path / "m1_hf", cfg, models[1])
    plan = plan_merge(
        open_source(tmp_path / "base_hf"), [open_source(paths[0]), open_source(tmp_path / "m1_hf")]
    )
    assert plan.backbone_only and plan.fresh_heads
    assert "only the backbone is merged" in plan.notes[0] and "freshly initialised" in plan.notes[1]
    state = merge(plan, [0.5, 0.5], seed=3)
    key = "encoder.layers.1.self_attn.k_proj.weight"
    expected = base[key] + 0.5 * (models[0][key] - base[key]) + 0.5 * (models[1][key] - base[key])
    torch.testing.assert_close(state[key], expected, rtol=0, atol=1e-6)
    assert torch.equal(state["label_embs_concat"], merge(plan, [0.5, 0.5], seed=3)["label_embs_concat"])
    write_merged(tmp_path / "out", cfg, state, {})
    assert load_model(tmp_path / "out" / "checkpoint.pt").cfg == cfg


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "scripts" / "merge.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env)


def test_cli_sweep_with_an_hf_input_writes_every_lambda_and_the_similarity(tmp_path):
    cfg, base, models, paths = write_models(tmp_path, 2)
    save_hf(tmp_path / "m1_hf", cfg, models[1])
    out = tmp_path / "sweep"
    result = run_cli(
        *("--base", str(tmp_path / "base.pt"), "--models", str(paths[0]), str(tmp_path / "m1_hf")),
        *("--out", str(out), "--sweep", "0.1,0.5", "--similarity"),
    )
    assert result.returncode == 0, result.stderr
    assert "only the backbone is merged" in result.stdout
    for value in ("0.1", "0.5"):
        folder = out / f"lambda_{value}"
        assert {p.name for p in folder.iterdir()} == {"checkpoint.pt", "hf", "merge.json"}
        assert {p.name for p in (folder / "hf").iterdir()} == {"config.json", "model.safetensors"}
        assert json.loads((folder / "merge.json").read_text())["lambdas"] == [float(value)] * 2
    state = load_model(out / "lambda_0.5" / "checkpoint.pt").state_dict()
    key = "encoder.layers.0.fc1.weight"
    expected = base[key] + 0.5 * (models[0][key] - base[key]) + 0.5 * (models[1][key] - base[key])
    torch.testing.assert_close(state[key], expected, rtol=0, atol=1e-6)
    assert torch.equal(state["final_proj.weight"], base["final_proj.weight"])
    assert len(list(csv.DictReader((out / "task_vector_similarity.csv").open()))) == 3
    assert (out / "task_vector_similarity.png").is_file()


def test_cli_refuses_different_architectures_in_one_line_per_problem(tmp_path):
    write_models(tmp_path, 1)
    other = tiny_config(encoder_layers=3)
    save_fairseq(tmp_path / "deeper.pt", other, MertModel(other).state_dict())
    result = run_cli(
        *(
            "--base",
            str(tmp_path / "base.pt"),
            "--models",
            str(tmp_path / "m0.pt"),
            str(tmp_path / "deeper.pt"),
        ),
        *("--out", str(tmp_path / "out")),
    )
    assert result.returncode == 2
    assert "different architectures" in result.stderr and "encoder_layers 3, the base 2" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
