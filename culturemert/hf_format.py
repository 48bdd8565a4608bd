"""The Hugging Face layout of a MERT backbone: ``transformers.HubertModel`` names and config.

Mapping of SPEC §1. The HF format holds the backbone only: the pre-training heads
(``final_proj``, ``label_embs_concat``, ``encoder_cqt_model``) have no HubertModel counterpart.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from culturemert.models.mert import MertConfig

# (fairseq name, HF name) templates; {i} is a layer index, {p} a projection (q, k, v or out).
_KEY_TEMPLATES = [
    ("feature_extractor.conv_layers.{i}.0.", "feature_extractor.conv_layers.{i}.conv."),
    ("feature_extractor.conv_layers.0.2.", "feature_extractor.conv_layers.0.layer_norm."),
    ("layer_norm.", "feature_projection.layer_norm."),
    ("post_extract_proj.", "feature_projection.projection."),
    ("mask_emb", "masked_spec_embed"),
    ("encoder.pos_conv.0.bias", "encoder.pos_conv_embed.conv.bias"),
    ("encoder.pos_conv.0.weight_g", "encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    ("encoder.pos_conv.0.weight_v", "encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
    ("encoder.layer_norm.", "encoder.layer_norm."),
    ("encoder.layers.{i}.self_attn.{p}_proj.", "encoder.layers.{i}.attention.{p}_proj."),
    ("encoder.layers.{i}.self_attn_layer_norm.", "encoder.layers.{i}.layer_norm."),
    ("encoder.layers.{i}.fc1.", "encoder.layers.{i}.feed_forward.intermediate_dense."),
    ("encoder.layers.{i}.fc2.", "encoder.layers.{i}.feed_forward.output_dense."),
    ("encoder.layers.{i}.final_layer_norm.", "encoder.layers.{i}.final_layer_norm."),
]

# Older transformers releases (and the m-a-p/MERT-v1-95M upload) store weight norm this way.
_LEGACY_HF_NAMES = {
    "encoder.pos_conv_embed.conv.weight_g": "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
    "encoder.pos_conv_embed.conv.weight_v": "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
}

HEAD_PREFIXES = ("final_proj.", "label_embs_concat", "encoder_cqt_model.")


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")
    pattern = pattern.replace(r"\{p\}", r"(?P<p>q|k|v|out)")
    return re.compile(pattern + r"(?P<rest>.*)")


def _translate(key: str, source: int) -> str | None:
    """Rename ``key`` from side ``source`` (0 fairseq, 1 HF) of the templates to the other."""
    for templates in _KEY_TEMPLATES:
        match = _template_regex(templates[source]).fullmatch(key)
        if match:
            names = match.groupdict()
            return templates[1 - source].format(**names) + names["rest"]
    return None


def fairseq_key_to_hf(key: str) -> str | None:
    """HF name of a fairseq backbone parameter; None for the pre-training heads."""
    if key.startswith(HEAD_PREFIXES):
        return None
    return _translate(key, 0)


def hf_key_to_fairseq(key: str) -> str | None:
    """fairseq name of an HF HubertModel parameter; None if it is not a MERT backbone name."""
    return _translate(_LEGACY_HF_NAMES.get(key, key), 1)


def hf_config_from_mert(cfg: MertConfig) -> dict:
    """``config.json`` contents that stock ``transformers.HubertModel`` builds the backbone from.

    The MERT-only fields (codebooks, heads) ride along under ``culturemert`` so a round trip
    through HF restores the full configuration.
    """
    conv_layers = cfg.conv_layers
    return {
        "model_type": "hubert",
        "architectures": ["HubertModel"],
        "hidden_size": cfg.encoder_embed_dim,
        "num_hidden_layers": cfg.encoder_layers,
        "num_attention_heads": cfg.encoder_attention_heads,
        "intermediate_size": cfg.encoder_ffn_embed_dim,
        "hidden_act": "gelu",
        "conv_dim": [c for c, _, _ in conv_layers],
        "conv_kernel": [k for _, k, _ in conv_layers],
        "conv_stride": [s for _, _, s in conv_layers],
        "num_feat_extract_layers": len(conv_layers),
        "conv_bias": cfg.conv_bias,
        "feat_extract_norm": "group",
        "feat_extract_activation": "gelu",
        "feat_proj_layer_norm": True,
        "do_stable_layer_norm": cfg.layer_norm_first,
        "num_conv_pos_embeddings": cfg.conv_pos,
        "num_conv_pos_embedding_groups": cfg.conv_pos_groups,
        "conv_pos_batch_norm": False,
        "layer_norm_eps": 1e-5,
        "hidden_dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout,
        "activation_dropout": cfg.activation_dropout,
        "feat_proj_dropout": cfg.dropout_input,
        "layerdrop": cfg.encoder_layerdrop,
        "culturemert": dataclasses.asdict(cfg),
    }


# HF settings a MERT backbone must have: (key, required value, transformers' default).
_REQUIRED_HF = [
    ("feat_extract_norm", "group", "group"),
    ("feat_extract_activation", "gelu", "gelu"),
    ("hidden_act", "gelu", "gelu"),
    ("feat_proj_layer_norm", True, True),
    ("conv_pos_batch_norm", False, False),
]


def mert_config_from_hf(config: dict, source: str) -> MertConfig:
    """MertConfig of an HF folder's ``config.json`` (ours, stock Hubert, or m-a-p's MERT)."""
    for key, required, default in _REQUIRED_HF:
        if config.get(key, default) != required:
            raise ValueError(
                f"{source}: config.json has {key}={config.get(key)!r}; a MERT backbone needs "
                f"{key}={required!r}"
            )
    extras = config.get("culturemert", {})
    layers = list(zip(config["conv_dim"], config["conv_kernel"], config["conv_stride"]))
    cfg = MertConfig.from_dict(extras)
    if cfg.conv_layers != layers:
        cfg.conv_feature_layers = repr(layers)
    cfg.conv_bias = bool(config.get("conv_bias", False))
    cfg.encoder_embed_dim = config["hidden_size"]
    cfg.encoder_layers = config["num_hidden_layers"]
    cfg.encoder_attention_heads = config["num_attention_heads"]
    cfg.encoder_ffn_embed_dim = config["intermediate_size"]
    cfg.layer_norm_first = bool(config.get("do_stable_layer_norm", False))
    cfg.conv_pos = config.get("num_conv_pos_embeddings", 128)
    cfg.conv_pos_groups = config.get("num_conv_pos_embedding_groups", 16)
    return cfg


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone tensors under HF names; the pre-training heads are left out."""
    converted = {}
    for key, value in state.items():
        hf_key = fairseq_key_to_hf(key)
        if hf_key is not None:
            converted[hf_key] = value
    return converted
