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
from culturemert.cli.init_model import main as init_main
from culturemert.cli.merge import main as merge_main
from culturemert.hf_format import to_hf_state_dict
from culturemert.models.mert import MertModel

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


class Weights(dict):
    """A dict subclass: what custom code may pickle; the safe loader refuses it."""


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
        return path, path.name, "a plain pickle of a dict, not a PyTorch checkpoint"
    if kind == "pickle of a custom type":
        path = folder / "custom.pt"
        path.write_bytes(pickle.dumps(Weights(model={})))
        return path, path.name, "a plain pickle of test_robustness_checkpoints.Weights, not a PyTorch"
    if kind == "not a checkpoint":
        path = folder / "text.pt"
        path.write_text("these are not the weights you are looking for\n" * 20)
        return path, path.name, "not a PyTorch checkpoint (it starts with text: 'these are not"
    if kind == "JSON as .pt":
        path = folder / "config.pt"
        path.write_text(json.dumps({"model": {"encoder_layers": 2}}))
        return path, path.name, "not a PyTorch checkpoint (it starts with JSON text)"
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
    if kind.startswith("sharded"):  # as save_pretrained(max_shard_size=...) writes them
        weights = "model.safetensors" if kind == "sharded safetensors" else "pytorch_model.bin"
        (path / "model.safetensors").rename(path / weights.replace(".", "-00001-of-00001."))
        index = {
            "metadata": {},
            "weight_map": {"masked_spec_embed": weights.replace(".", "-00001-of-00001.")},
        }
        (path / f"{weights}.index.json").write_text(json.dumps(index))
        return path, f"sharded ({weights}.index.json)", 'save_pretrained(folder, max_shard_size="10GB")'
    raise AssertionError(kind)


KINDS = [
    "plain pickle",
    "pickle of a custom type",
    "not a checkpoint",
    "JSON as .pt",
    "truncated .pt",
    "truncated safetensors header",
    "truncated safetensors data",
    "config not JSON",
    "config lacking a field",
    "no weights",
    "sharded safetensors",
    "sharded bin",
]


@pytest.mark.parametrize("kind", KINDS)
def test_a_malformed_checkpoint_is_one_line_naming_the_file_in_every_tool(
    kind, good, tmp_path, capsys, recwarn
):
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
    assert not [w for w in recwarn if "torch" in w.filename], [str(w.message) for w in recwarn]
    if not path.is_dir() and kind != "truncated .pt":  # a flag that cannot help is not offered
        assert "trust" not in message, message


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
        ("encoder_attention_heads", 0, "encoder_attention_heads=0 is not a positive integer"),
        ("encoder_attention_heads", 5, "encoder_attention_heads=5 does not divide encoder_embed_dim=64"),
        ("conv_pos", "wide", "conv_pos='wide' is not an integer"),
        ("conv_feature_layers", "[(32,10,5)] + __import__('os')", "\"__import__('os')\" is not allowed"),
        ("layer_norm_first", "maybe", "layer_norm_first='maybe' is not a boolean"),
        ("encoder_layers", [2], "encoder_layers=[2] is not an integer"),
        ("conv_feature_layers", "[(32,10,5)", "conv_feature_layers='[(32,10,5)' is not valid notation"),
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


def _tiny_yaml(folder: Path, replace: str = "", by: str = "") -> Path:
    path = folder / "model.yaml"
    text = (REPO / "configs/model/tiny.yaml").read_text()
    assert replace in text
    path.write_text(text.replace(replace, by))
    return path


@pytest.mark.parametrize(
    "case, named, problem",
    [
        ("missing", "missing.yaml", "no such model YAML"),
        ("folder", "folder.yaml", "a folder, not a model YAML"),
        ("invalid YAML", "model.yaml", "not valid YAML"),
        ("a list", "model.yaml", "holds a list, not a mapping"),
        ("negative layers", "model.yaml", "encoder_layers=-1 is not a positive integer"),
        ("heads", "model.yaml", "encoder_attention_heads=3 does not divide encoder_embed_dim=128"),
        ("maybe", "model.yaml", "layer_norm_first='maybe' is not a boolean"),
        ("a list for an int", "model.yaml", "encoder_layers=[2] is not an integer"),
        ("a string for an int", "model.yaml", "encoder_embed_dim='128' is not an integer"),
        ("conv notation", "model.yaml", "conv_feature_layers='[(64,10,5)] + ((' is not valid notation"),
    ],
)
def test_init_model_refuses_a_model_yaml_that_makes_no_model_before_writing(
    case, named, problem, tmp_path, capsys
):
    edits = {
        "invalid YAML": ("encoder_layers: 2", "encoder_layers: [2"),
        "negative layers": ("encoder_layers: 2", "encoder_layers: -1"),
        "heads": ("encoder_attention_heads: 4", "encoder_attention_heads: 3"),
        "maybe": ("layer_norm_first: false", "layer_norm_first: maybe"),
        "a list for an int": ("encoder_layers: 2", "encoder_layers: [2]"),
        "a string for an int": ("encoder_embed_dim: 128", "encoder_embed_dim: '128'"),
        "conv notation": ('"[(64,10,5)] + [(64,3,2)] * 4 + [(64,2,2)] * 2"', '"[(64,10,5)] + (("'),
    }
    path = tmp_path / named
    if case in edits:
        _tiny_yaml(tmp_path, *edits[case])
    elif case == "a list":  # the fields as list items
        text = (REPO / "configs/model/tiny.yaml").read_text()
        path.write_text("".join(f"- {line}\n" for line in text.splitlines() if ":" in line))
    elif case == "folder":
        path.mkdir()
    out = tmp_path / "init.pt"
    message = refusal(capsys, init_main, "init_model", "--config", path, "--out", out)
    assert named in message and problem in message, message
    assert not out.exists()


def test_init_model_writes_what_the_readers_accept(tmp_path, capsys):
    out = tmp_path / "init.pt"
    assert run(init_main, "init_model", ["--config", str(_tiny_yaml(tmp_path)), "--out", str(out)]) == 0
    assert run(convert_main, "convert_checkpoint", [str(out), str(tmp_path / "hf")]) == 0
    assert load_model(tmp_path / "hf").cfg.encoder_embed_dim == 128


def test_converting_an_hf_folder_twice_writes_the_same_file(good, tmp_path):
    for name in ("first.pt", "second.pt"):
        assert run(convert_main, "convert_checkpoint", [str(good["hf"]), str(tmp_path / name)]) == 0
    assert (tmp_path / "first.pt").read_bytes() == (tmp_path / "second.pt").read_bytes()


def test_trust_checkpoint_reaches_the_pytorch_model_bin_of_an_hf_folder(good, tmp_path, capsys):
    folder = tmp_path / "custom_bin"
    shutil.copytree(good["hf"], folder)
    (folder / "model.safetensors").unlink()
    torch.save(Weights(to_hf_state_dict(good["state"])), folder / "pytorch_model.bin")
    message = refusal(capsys, convert_main, "convert_checkpoint", folder, tmp_path / "refused.pt")
    assert "pytorch_model.bin" in message and "Weights" in message and "--trust-checkpoint" in message
    assert not (tmp_path / "refused.pt").exists()
    argv = [str(folder), str(tmp_path / "trusted.pt"), "--trust-checkpoint"]
    assert run(convert_main, "convert_checkpoint", argv) == 0
    converted = read_fairseq(tmp_path / "trusted.pt")[1]
    assert torch.equal(converted["encoder.layers.1.fc2.weight"], good["state"]["encoder.layers.1.fc2.weight"])
    assert load_model(folder, trust_checkpoint=True).cfg.encoder_layers == 2


def test_a_legacy_pickle_protocol_4_checkpoint_is_refused_without_torch_warnings(
    good, tmp_path, capsys, recwarn
):
    checkpoint = torch.load(good["pt"], weights_only=False)
    checkpoint["extra"] = Weights()
    path = tmp_path / "legacy4.pt"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False, pickle_protocol=4)
    message = refusal(capsys, convert_main, "convert_checkpoint", path, tmp_path / "hf")
    assert "legacy4.pt" in message and "--trust-checkpoint" in message, message
    assert "Please file an issue" not in message and not [w for w in recwarn if "torch" in w.filename]
    argv = [str(path), str(tmp_path / "hf"), "--trust-checkpoint"]
    assert run(convert_main, "convert_checkpoint", argv) == 0
