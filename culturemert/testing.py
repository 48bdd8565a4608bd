"""Inputs in the exact layouts users have, built from random weights, for tests and benchmarks.

``write_release_checkpoint`` writes a fairseq ``.pt`` laid out like the published
``MERT-v1-95M_fairseq.pt`` (thesis 3.2): the configuration as plain dicts under ``cfg`` with
``args: None``, the model's settings beside task and loss settings MertConfig does not know,
``label_embs_concat`` of ``num_codebooks x (codebook_size + 4)`` rows, weight-norm names
``weight_g``/``weight_v``, the nnAudio CQT kernel buffers the release keeps inside its model
(``encoder_cqt_model.spec_layer.*``), and the optimizer history, extra state and Adam state of a
finished run. ``write_hub_folder`` writes an HF folder as uploaded to the Hub (m-a-p style
``config.json``, backbone only, old or new weight-norm names, safetensors or a pickled ``.bin``).
Both return the model's state dict under fairseq names, to compare against what a reader gives.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from culturemert.hf_format import hf_config_from_mert, to_hf_state_dict
from culturemert.models.mert import MertConfig, MertModel
from culturemert.targets.cqt import CQTSettings, nnaudio_cqt

# Settings of the MERT-v1 release's model config that MertConfig has no field for; a reader must
# ignore them (values as in the release's pre-training YAML).
RELEASE_MODEL_EXTRAS = {
    "label_rate": 75.0,
    "extractor_mode": "default",
    "activation_fn": "gelu",
    "layer_type": "transformer",
    "dropout_features": 0.0,
    "untie_final_proj": True,
    "target_glu": False,
    "mask_selection": "static",
    "mask_other": 0.0,
    "no_mask_overlap": False,
    "mask_min_space": 1,
    "mask_channel_length": 10,
    "mask_channel_prob": 0.0,
    "skip_masked": False,
    "skip_nomask": True,
    "checkpoint_activations": False,
    "required_seq_len_multiple": 2,
    "deepnorm": False,
    "subln": False,
    "attention_relax": -1.0,
    "audio_extract_type": "waveform",
    "audio_cqt_loss_m": True,
    "audio_cqt_bins": 336,
    "learnable_temp": False,
    "mixture_prob": 0.5,
    "inbatch_noise_augment_len_range": "[12000, 36000]",
    "inbatch_noise_augment_number_range": "[1, 3]",
    "inbatch_noise_augment_volume": 1.0,
}

RELEASE_TASK = {
    "_name": "mert_pretraining",
    "data": "/path/to/manifests",
    "label_dir": "/path/to/labels",
    "labels": [f"encodec_{i}" for i in range(8)],
    "label_rate": 75.0,
    "sample_rate": 24000,
    "max_sample_size": 120000,
    "min_sample_size": 72000,
    "pad_audio": False,
    "random_crop": True,
    "normalize": False,
    "enable_padding": False,
}

RELEASE_CRITERION = {
    "_name": "hubert",
    "pred_masked_weight": 1.0,
    "pred_nomask_weight": 0.0,
    "loss_weights": [10.0, 1.0],
    "log_keys": ["accuracies"],
}


def _random_model(cfg: MertConfig, seed: int) -> MertModel:
    torch.manual_seed(seed)
    return MertModel(cfg)


def _adam_state(state: dict[str, torch.Tensor], updates: int) -> dict:
    """fairseq's FairseqAdam state of a finished run: moments per parameter, integer keys."""
    params = [v for k, v in state.items() if not k.startswith("encoder_cqt_model.spec_layer.")]
    return {
        "state": {
            index: {"step": updates, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            for index, p in enumerate(params)
        },
        "param_groups": [
            {
                "lr": [0.0],
                "betas": (0.9, 0.98),
                "eps": 1e-6,
                "weight_decay": 0.01,
                "amsgrad": False,
                "params": list(range(len(params))),
            }
        ],
        "loss_scale": 128.0,
    }


def write_release_checkpoint(
    path: str | os.PathLike, cfg: MertConfig | None = None, seed: int = 0, optimizer_state: bool = True
) -> dict[str, torch.Tensor]:
    """Write a random MERT of ``cfg`` (default MERT-v1-95M) at ``path`` in the layout of the
    published ``MERT-v1-95M_fairseq.pt``; returns its state dict (CQT buffers included).

    The CQT kernels are nnAudio's at the thesis settings (thesis 3.2) with ``cfg.cqt_bins`` bins:
    about 176 MB for 336 bins. ``optimizer_state=False`` leaves the Adam moments out (the
    published file's size is then about the model's)."""
    cfg = cfg or MertConfig()
    state = _random_model(cfg, seed).state_dict()
    kernels = nnaudio_cqt(CQTSettings(n_bins=cfg.cqt_bins)).state_dict()
    state.update({f"encoder_cqt_model.spec_layer.{k}": v for k, v in kernels.items()})
    updates = 400_000
    model_cfg = {**RELEASE_MODEL_EXTRAS, **dataclasses.asdict(cfg), "_name": "mert"}
    checkpoint = {
        "args": None,
        "cfg": {
            "_name": None,
            "common": {"_name": None, "fp16": True, "seed": 1337, "log_interval": 200},
            "distributed_training": {"_name": None, "distributed_world_size": 64, "ddp_backend": "no_c10d"},
            "dataset": {"_name": None, "max_tokens": 900000, "num_workers": 6},
            "optimization": {"_name": None, "max_update": updates, "lr": [0.0005], "clip_norm": 10.0},
            "checkpoint": {"_name": None, "save_interval_updates": 5000, "keep_interval_updates": -1},
            "model": model_cfg,
            "task": dict(RELEASE_TASK),
            "criterion": dict(RELEASE_CRITERION),
            "optimizer": {
                "_name": "adam",
                "adam_betas": "(0.9,0.98)",
                "adam_eps": 1e-06,
                "weight_decay": 0.01,
            },
            "lr_scheduler": {
                "_name": "polynomial_decay",
                "warmup_updates": 32000,
                "total_num_update": updates,
            },
            "scoring": None,
            "bpe": None,
            "tokenizer": None,
            "ema": {"_name": None, "store_ema": False},
        },
        "model": state,
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": "ModelCriterion",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {"best": 3.21},
                "num_updates": updates,
            }
        ],
        "task_state": {},
        "extra_state": {
            "epoch": 41,
            "train_iterator": {"epoch": 41, "iterations_in_epoch": 1234, "shuffle": True, "version": 2},
            "previous_training_time": 1.0e6,
            "best": 3.21,
        },
        "last_optimizer_state": _adam_state(state, updates) if optimizer_state else None,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return state


# m-a-p/MERT-v1-95M's config.json beside the HubertModel fields (its own model class and
# transformers' generic settings); readers must accept and ignore them.
HUB_CONFIG_EXTRAS = {
    "architectures": ["MERTModel"],
    "auto_map": {
        "AutoConfig": "configuration_MERT.MERTConfig",
        "AutoModel": "modeling_MERT.MERTModel",
    },
    "model_type": "mert_model",
    "apply_spec_augment": True,
    "attention_relax": -1.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "classifier_proj_size": 256,
    "ctc_loss_reduction": "sum",
    "ctc_zero_infinity": False,
    "deepnorm": False,
    "feature_extractor_cqt": False,
    "feature_extractor_cqt_bins": 336,
    "final_dropout": 0.1,
    "gradient_checkpointing": False,
    "initializer_range": 0.02,
    "mask_feature_length": 10,
    "mask_feature_prob": 0.0,
    "mask_time_length": 10,
    "mask_time_prob": 0.05,
    "sample_rate": 24000,
    "tokenizer_class": "Wav2Vec2CTCTokenizer",
    "torch_dtype": "float32",
    "transformers_version": "4.25.1",
    "use_weighted_layer_sum": False,
    "vocab_size": 32,
}

_NEW_WEIGHT_NORM = "encoder.pos_conv_embed.conv.parametrizations.weight.original"
_OLD_WEIGHT_NORM = {"0": "encoder.pos_conv_embed.conv.weight_g", "1": "encoder.pos_conv_embed.conv.weight_v"}


def write_hub_folder(
    folder: str | os.PathLike,
    cfg: MertConfig | None = None,
    weights: str = "safetensors",
    legacy_weight_norm: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Write a random MERT backbone of ``cfg`` as an HF folder laid out like m-a-p/MERT-v1-95M:
    ``config.json`` (HubertModel fields plus m-a-p's, no ``culturemert`` section) and
    ``model.safetensors`` (``weights="safetensors"``) or ``pytorch_model.bin`` (``"bin"``), with
    weight norm as ``weight_g``/``weight_v`` (``legacy_weight_norm``, the upload's) or as
    ``parametrizations.weight.original0/1`` (transformers >= 4.x saves). Returns the full
    fairseq-named state dict the backbone came from (heads included, though not written)."""
    if weights not in ("safetensors", "bin"):
        raise ValueError(f"weights must be 'safetensors' or 'bin', not {weights!r}")
    cfg = cfg or MertConfig()
    state = _random_model(cfg, seed).state_dict()
    tensors = {}
    for key, value in to_hf_state_dict(state).items():
        if legacy_weight_norm and key.startswith(_NEW_WEIGHT_NORM):
            key = _OLD_WEIGHT_NORM[key[len(_NEW_WEIGHT_NORM) :]]
        tensors[key] = value.contiguous()
    config = hf_config_from_mert(cfg)
    del config["culturemert"]
    config.update(HUB_CONFIG_EXTRAS)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if weights == "safetensors":
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        torch.save(tensors, folder / "pytorch_model.bin")
    return state
