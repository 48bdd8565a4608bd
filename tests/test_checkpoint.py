"""Checkpoint formats: released key names, conversions, refusals and safe unpickling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from fairseq import checkpoint_utils
from safetensors.torch import load_file, save_file

from culturemert import load_model
from culturemert.checkpoint import (
    CheckpointError,
    build_and_load,
    convert,
    read_checkpoint,
    save_fairseq,
)
from culturemert.models.mert import MertConfig, MertModel

REPO = Path(__file__).resolve().parents[1]


def released_state_dict() -> dict[str, torch.Tensor]:
    """Random tensors under exactly the key names and shapes of MERT-v1-95M_fairseq.pt
    (thesis 3.2), written out independently of the model code."""
    keys = {"feature_extractor.conv_layers.0.0.weight": (512, 1, 10)}
    keys |= {f"feature_extractor.conv_layers.{i}.0.weight": (512, 512, 3) for i in range(1, 5)}
    keys |= {f"feature_extractor.conv_layers.{i}.0.weight": (512, 512, 2) for i in (5, 6)}
    keys |= {
        "feature_extractor.conv_layers.0.2.weight": (512,),
        "feature_extractor.conv_layers.0.2.bias": (512,),
    }
    keys |= {"layer_norm.weight": (512,), "layer_norm.bias": (512,)}
    keys |= {"post_extract_proj.weight": (768, 512), "post_extract_proj.bias": (768,)}
    keys |= {"mask_emb": (768,)}
    keys |= {"encoder.pos_conv.0.bias": (768,), "encoder.pos_conv.0.weight_g": (1, 1, 128)}
    keys |= {"encoder.pos_conv.0.weight_v": (768, 48, 128)}
    keys |= {"encoder.layer_norm.weight": (768,), "encoder.layer_norm.bias": (768,)}
    for i in range(12):
        layer = f"encoder.layers.{i}."
        for proj in "qkv":
            keys |= {f"{layer}self_attn.{proj}_proj.weight": (768, 768)}
            keys |= {f"{layer}self_attn.{proj}_proj.bias": (768,)}
        keys |= {f"{layer}self_attn.out_proj.weight": (768, 768), f"{layer}self_attn.out_proj.bias": (768,)}
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            keys |= {f"{layer}{norm}.weight": (768,), f"{layer}{norm}.bias": (768,)}
        keys |= {f"{layer}fc1.weight": (3072, 768), f"{layer}fc1.bias": (3072,)}
        keys |= {f"{layer}fc2.weight": (768, 3072), f"{layer}fc2.bias": (768,)}
    keys |= {"final_proj.weight": (512, 768), "final_proj.bias": (512,)}
    keys |= {"label_embs_concat": (8 * 1028, 64)}
    keys |= {"encoder_cqt_model.fc.weight": (336, 768), "encoder_cqt_model.fc.bias": (336,)}
    state = {name: torch.randn(shape) for name, shape in keys.items()}
    # nnAudio CQT kernels the release stored inside its model (derived buffers).
    state["encoder_cqt_model.spec_layer.lenghts"] = torch.ones(336)
    state["encoder_cqt_model.spec_layer.cqt_kernels_real"] = torch.zeros(336, 1, 8)
    state["encoder_cqt_model.spec_layer.cqt_kernels_imag"] = torch.zeros(336, 1, 8)
    return state


def test_released_key_names_load_and_count_95_550_160_parameters(tmp_path):
    state = released_state_dict()
    model = build_and_load("released", MertConfig(), state)
    assert sum(p.numel() for p in model.parameters()) == 95_550_160
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)

    # The same as a released-style .pt: cfg with extra, non-architectural fields of the release.
    checkpoint = {
        "cfg": {"model": {"_name": "mert", "encoder_layers": 12, "label_rate": 75.0}},
        "model": state,
    }
    torch.save(checkpoint, tmp_path / "MERT-v1-95M_fairseq.pt")
    model = load_model(tmp_path / "MERT-v1-95M_fairseq.pt")
    assert torch.equal(model.label_embs_concat, state["label_embs_concat"])


def test_fairseq_hf_fairseq_round_trip_is_bit_identical(tmp_path, seeded):
    cfg = tiny_config()
    original = MertModel(cfg).state_dict()
    save_fairseq(tmp_path / "a.pt", cfg, original)
    message = convert(tmp_path / "a.pt", tmp_path / "hf")
    assert "label_embs_concat" in message  # the tool says which heads it drops
    message = convert(tmp_path / "hf", tmp_path / "b.pt")
    assert "freshly initialised" in message
    back = read_checkpoint(tmp_path / "b.pt")["model"]
    heads = ("final_proj.", "label_embs_concat", "encoder_cqt_model.")
    backbone = [k for k in original if not k.startswith(heads)]
    assert len(backbone) == len(original) - 5
    for key in backbone:
        assert back[key].dtype == original[key].dtype
        assert torch.equal(back[key], original[key]), key
    assert set(back) == set(original)
    # The HF config round-trips the MERT-only fields too.
    assert load_model(tmp_path / "b.pt").cfg == cfg


def test_hf_folder_loads_in_stock_transformers(tmp_path, seeded):
    from transformers import AutoModel, HubertModel

    cfg = tiny_config(layer_norm_first=True)
    save_fairseq(tmp_path / "a.pt", cfg, MertModel(cfg).state_dict())
    convert(tmp_path / "a.pt", tmp_path / "hf")
    hubert, info = AutoModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert isinstance(hubert, HubertModel)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hubert.config.do_stable_layer_norm is True


def test_our_pt_is_read_by_fairseqs_own_loader(tmp_path, seeded):
    cfg = tiny_config()
    save_fairseq(tmp_path / "a.pt", cfg, MertModel(cfg).state_dict())
    state = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "a.pt"))
    assert state["cfg"]["model"]["_name"] == "mert"
    assert state["cfg"]["model"]["encoder_layers"] == 2


def test_bad_states_are_refused_with_every_problem_listed(tmp_path, seeded):
    cfg = tiny_config()
    state = MertModel(cfg).state_dict()
    del state["encoder.layers.1.fc1.bias"]
    state["encoder.layers.0.extra.weight"] = torch.zeros(1)
    state["post_extract_proj.weight"] = torch.zeros(3, 3)
    save_fairseq(tmp_path / "bad.pt", cfg, state)
    with pytest.raises(CheckpointError) as error:
        convert(tmp_path / "bad.pt", tmp_path / "hf")
    text = str(error.value)
    assert "missing keys: encoder.layers.1.fc1.bias" in text
    assert "unexpected keys: encoder.layers.0.extra.weight" in text
    assert "post_extract_proj.weight: checkpoint (3, 3) vs model (64, 32)" in text
    assert not (tmp_path / "hf").exists()


def test_hf_folder_with_foreign_keys_is_refused(tmp_path, seeded):
    cfg = tiny_config()
    save_fairseq(tmp_path / "a.pt", cfg, MertModel(cfg).state_dict())
    convert(tmp_path / "a.pt", tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    tensors["lm_head.weight"] = torch.zeros(2, 2)
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_model(tmp_path / "hf")


def test_missing_checkpoint_says_what_to_get(tmp_path):
    with pytest.raises(CheckpointError, match="MERT-v1-95M_fairseq.pt"):
        load_model(tmp_path / "nowhere.pt")


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    state = MertModel(tiny_config()).state_dict()
    torch.save({"cfg": {"model": {}}, "model": state, "extra": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"refused to unpickle .*system") as error:
        load_model(tmp_path / "evil.pt")
    assert "trust_checkpoint=True" in str(error.value)
    assert not marker.exists()

    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "convert_checkpoint.py"),
            str(tmp_path / "evil.pt"),
            str(tmp_path / "hf"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "refused to unpickle" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()

    with pytest.raises(CheckpointError):  # the payload runs only when trusted explicitly
        load_model(tmp_path / "evil.pt", trust_checkpoint=True)
    assert marker.exists()


def test_map_style_folder_with_bin_weights_and_legacy_weight_norm_names(tmp_path, seeded):
    """The m-a-p/MERT-v1-95M upload: model_type 'mert_model', pytorch_model.bin, weight_g/v."""
    import json

    cfg = tiny_config()
    original = MertModel(cfg).eval()
    save_fairseq(tmp_path / "a.pt", cfg, original.state_dict())
    convert(tmp_path / "a.pt", tmp_path / "hf")
    legacy = {
        key.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): value
        for key, value in load_file(tmp_path / "hf" / "model.safetensors").items()
    }
    folder = tmp_path / "map"
    folder.mkdir()
    torch.save(legacy, folder / "pytorch_model.bin")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.pop("culturemert")
    config["model_type"] = "mert_model"
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_model(folder)
    wav = torch.randn(1, 24_000)
    with torch.no_grad():
        for a, b in zip(loaded.hidden_states(wav), original.hidden_states(wav)):
            assert torch.equal(a, b)
