"""Malformed and hostile checkpoints (issue 11 item 5): every tool that reads a checkpoint (convert,
merge, and ``load_model`` behind probe extract) refuses it in one line naming the file and the
problem, writes nothing, and never allocates what a stored config asks for before the stored
shapes agree; HF config fields are honoured or refused; non-finite weights are refused."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from culturemert import load_model
from culturemert.checkpoint import CheckpointError, read_fairseq, save_fairseq, save_hf
from culturemert.cli import run
from culturemert.cli.convert_checkpoint import main as convert_main
from culturemert.cli.merge import main as merge_main
from culturemert.models.mert import MertModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    """A tiny model as a fairseq .pt and as an HF folder."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("good")
    cfg = tiny_config()
    state = MertModel(cfg).state_dict()
    save_fairseq(folder / "model.pt", cfg, state)
    save_hf(folder / "hf", cfg, state)
    return {"pt": folder / "model.pt", "hf": folder / "hf", "state": state, "cfg": cfg}


def refusal(capsys, main, prog: str, *argv: str | Path) -> str:
    """Run a tool as its command line does; the one line it printed on stderr (status 2)."""
    assert run(main, prog, [str(a) for a in argv]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"{prog}: ")]
    assert len(lines) == 1, lines
    return lines[0]


def malformed(kind: str, good: dict, folder: Path) -> tuple[Path, str, str]:
    """A malformed checkpoint of ``kind``: (path, the file the message must name, the problem)."""
    pt_bytes = good["pt"].read_bytes()
    weights = (good["hf"] / "model.safetensors").read_bytes()
    if kind == "plain pickle":
        path = folder / "pickled.pt"
        path.write_bytes(pickle.dumps({"model": {"mask_emb": [0.0] * 4}}))
        return path, path.name, "legacy non-zip .pt or a plain pickle"
    if kind == "not a checkpoint":
        path = folder / "text.pt"
        path.write_text("these are not the weights you are looking for\n" * 20)
        return path, path.name, "not a readable PyTorch checkpoint"
    if kind == "truncated .pt":
        path = folder / "half.pt"
        path.write_bytes(pt_bytes[: len(pt_bytes) // 2])
        return path, path.name, "not a readable PyTorch checkpoint"
    path = folder / kind.replace(" ", "_")
    shutil.copytree(good["hf"], path)
    config = json.loads((path / "config.json").read_text())
    if kind == "truncated safetensors header":
        (path / "model.safetensors").write_bytes(weights[:40])
        return path, "model.safetensors", "truncated or not a safetensors file"
    if kind == "truncated safetensors data":
        (path / "model.safetensors").write_bytes(weights[:-1000])
        return path, "model.safetensors", "truncated or not a safetensors file"
    if kind == "config not JSON":
        (path / "config.json").write_text('{"hidden_size": 64,')
        return path, "config.json", "not valid JSON"
    if kind == "config lacking a field":
        del config["intermediate_size"]
        (path / "config.json").write_text(json.dumps(config))
        return path, "config.json", "lacks intermediate_size"
    if kind == "no weights":
        (path / "model.safetensors").unlink()
        return path, path.name, "no weights"
    raise AssertionError(kind)


KINDS = [
    "plain pickle",
    "not a checkpoint",
    "truncated .pt",
    "truncated safetensors header",
    "truncated safetensors data",
    "config not JSON",
    "config lacking a field",
    "no weights",
]


@pytest.mark.parametrize("kind", KINDS)
def test_a_malformed_checkpoint_is_one_line_naming_the_file_in_every_tool(kind, good, tmp_path, capsys):
    path, named, problem = malformed(kind, good, tmp_path)
    destination = tmp_path / ("converted.pt" if path.is_dir() else "converted_hf")
    for message in (
        refusal(capsys, convert_main, "convert_checkpoint", path, destination),
        refusal(capsys, merge_main, "merge", "--base", good["pt"], "--models", path, "--out", tmp_path / "m"),
    ):
        assert named in message and problem in message, message
    with pytest.raises(CheckpointError, match=re.escape(problem)) as error:
        load_model(path)  # what probe extract calls
    assert named in str(error.value) and "\n" not in str(error.value)
    assert not destination.exists() and not (tmp_path / "m").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial output


def test_a_legacy_non_zip_pt_that_is_a_real_checkpoint_still_converts(good, tmp_path, capsys):
    checkpoint = torch.load(good["pt"], weights_only=False)
    torch.save(checkpoint, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert run(convert_main, "convert_checkpoint", [str(tmp_path / "legacy.pt"), str(tmp_path / "hf")]) == 0
    loaded = load_model(tmp_path / "hf").state_dict()
    assert torch.equal(loaded["encoder.layers.1.fc2.weight"], good["state"]["encoder.layers.1.fc2.weight"])


@pytest.mark.parametrize(
    "field, value, problem",
    [
        (
            "encoder_ffn_embed_dim",
            2_000_000_000,
            "fc1.weight: checkpoint (128, 64) vs model (2000000000, 64)",
        ),
        ("conv_feature_layers", "[(32,10,5)] * 100000000", "more than 1000 layers"),
        ("encoder_layers", 100_000_000, "asks for 100000000 transformer layers, its weights hold 2"),
        ("encoder_attention_heads", 0, "encoder_attention_heads=0; sizes must be positive integers"),
        ("encoder_attention_heads", 5, "which does not divide it"),
        ("conv_pos", "wide", "conv_pos='wide'; sizes must be positive integers"),
        ("conv_feature_layers", "[(32,10,5)] + __import__('os')", "does not describe a MERT model"),
    ],
)
def test_sizes_in_a_stored_config_are_checked_against_the_tensors_before_allocating(
    field, value, problem, good, tmp_path, capsys
):
    checkpoint = torch.load(good["pt"], weights_only=False)
    checkpoint["cfg"]["model"][field] = value
    torch.save(checkpoint, tmp_path / "lying.pt")
    message = refusal(capsys, convert_main, "convert_checkpoint", tmp_path / "lying.pt", tmp_path / "hf")
    assert "lying.pt" in message and problem in message, message
    with pytest.raises(CheckpointError, match=re.escape(problem)):
        load_model(tmp_path / "lying.pt")
    assert not (tmp_path / "hf").exists()


def test_hf_layer_norm_eps_is_honoured_like_transformers(good, tmp_path):
    from transformers import HubertModel

    folder = tmp_path / "eps"
    shutil.copytree(good["hf"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["layer_norm_eps"] = 0.5
    config.pop("culturemert")  # as a stock upload has it
    (folder / "config.json").write_text(json.dumps(config))
    ours = load_model(folder)
    assert ours.cfg.layer_norm_eps == 0.5
    hubert = HubertModel.from_pretrained(folder).eval()
    wav = torch.randn(1, 24_000)
    with torch.no_grad():
        theirs = hubert(wav, output_hidden_states=True).hidden_states
        for a, b in zip(ours.hidden_states(wav), theirs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    save_hf(tmp_path / "again", ours.cfg, ours.state_dict())  # and it is written back
    assert json.loads((tmp_path / "again" / "config.json").read_text())["layer_norm_eps"] == 0.5


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_act", "relu"),
        ("feat_extract_activation", "relu"),
        ("feat_extract_norm", "layer"),
        ("conv_pos_batch_norm", True),
        ("feat_proj_layer_norm", False),
        ("deepnorm", True),
        ("conv_kernel", [10, 3, 3, 3, 3, 2]),
        ("layer_norm_eps", -1.0),
    ],
)
def test_hf_config_fields_mert_cannot_follow_are_refused(field, value, good, tmp_path, capsys):
    folder = tmp_path / "odd"
    shutil.copytree(good["hf"], folder)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    message = refusal(capsys, convert_main, "convert_checkpoint", folder, tmp_path / "out.pt")
    assert "config.json" in message and field in message, message
    assert not (tmp_path / "out.pt").exists()


def test_non_finite_weights_are_refused_for_training_merging_and_probing(good, tmp_path, capsys):
    state = dict(good["state"])
    state["encoder.layers.1.fc1.weight"] = state["encoder.layers.1.fc1.weight"].clone()
    state["encoder.layers.1.fc1.weight"][0, 0] = float("nan")
    state["mask_emb"] = torch.full_like(state["mask_emb"], float("inf"))
    save_fairseq(tmp_path / "nan.pt", good["cfg"], state)
    save_hf(tmp_path / "nan_hf", good["cfg"], state)
    expected = ["nan.pt: encoder.layers.1.fc1.weight", "nan.pt: mask_emb"]
    for call in (lambda: read_fairseq(tmp_path / "nan.pt"), lambda: load_model(tmp_path / "nan_hf")):
        with pytest.raises(CheckpointError, match="non-finite weights") as error:
            call()  # read_fairseq prepares CPT's start; load_model is probing's
    assert all(name in str(error.value) for name in ["nan_hf: mask_emb"])
    message = refusal(
        capsys,
        merge_main,
        "merge",
        "--base",
        good["pt"],
        "--models",
        tmp_path / "nan.pt",
        "--out",
        tmp_path / "m",
    )
    assert all(name in message for name in expected), message
    message = refusal(capsys, convert_main, "convert_checkpoint", tmp_path / "nan.pt", tmp_path / "hf")
    assert all(name in message for name in expected), message
    assert not (tmp_path / "m").exists() and not (tmp_path / "hf").exists()
