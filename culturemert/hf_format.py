"""The Hugging Face layout of a MERT backbone: ``transformers.HubertModel`` names and config.

The names of the released checkpoint (thesis 3.2) mapped to HubertModel's. The HF format holds
the backbone only: the pre-training heads (``final_proj``, ``label_embs_concat``,
``encoder_cqt_model``) have no HubertModel counterpart.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from culturemert.models.config import MertConfig

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

# The dtypes of safetensors files, by the names their headers use.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
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
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout,
        "activation_dropout": cfg.activation_dropout,
        "feat_proj_dropout": cfg.dropout_input,
        "layerdrop": cfg.encoder_layerdrop,
        "culturemert": dataclasses.asdict(cfg),
    }


# HF settings the MERT backbone's maths is fixed to: (key, required value, transformers' default).
# m-a-p's MERT code adds ``deepnorm``, ``attention_relax`` and ``feature_extractor_cqt``.
_REQUIRED_HF = [
    ("feat_extract_norm", "group", "group"),
    ("feat_extract_activation", "gelu", "gelu"),
    ("hidden_act", "gelu", "gelu"),
    ("feat_proj_layer_norm", True, True),
    ("conv_pos_batch_norm", False, False),
    ("deepnorm", False, False),
    ("feature_extractor_cqt", False, False),
]

# Sizes read from config.json: (HF key, MertConfig field, transformers' default or None where
# the key is required); each must be a positive integer.
_SIZES = [
    ("hidden_size", "encoder_embed_dim", None),
    ("num_hidden_layers", "encoder_layers", None),
    ("num_attention_heads", "encoder_attention_heads", None),
    ("intermediate_size", "encoder_ffn_embed_dim", None),
    ("num_conv_pos_embeddings", "conv_pos", 128),
    ("num_conv_pos_embedding_groups", "conv_pos_groups", 16),
]
_CONV_KEYS = ("conv_dim", "conv_kernel", "conv_stride")


def _positive_int(source: str, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{source}: {key}={value!r} is not a positive integer")
    return value


def _boolean(source: str, key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{source}: {key}={value!r} is not a boolean (true or false)")
    return value


def mert_config_from_hf(config: dict, source: str) -> MertConfig:
    """MertConfig of an HF folder's ``config.json`` (ours, stock Hubert, or m-a-p's MERT).

    Every field the backbone's maths depends on is honoured (sizes, the conv stack and its bias,
    ``do_stable_layer_norm``, ``layer_norm_eps``) or, where MERT cannot follow it, refused
    (``_REQUIRED_HF``, ``attention_relax``); a ``ValueError`` names the field, and the result
    passes `MertConfig.check` (attention heads that divide the width, say).
    """
    if not isinstance(config, dict):
        raise ValueError(f"{source}: config.json is not a JSON object")
    source = f"{source}: config.json"
    for key, required, default in _REQUIRED_HF:
        if config.get(key, default) != required:
            raise ValueError(
                f"{source} has {key}={config.get(key)!r}; a MERT backbone needs {key}={required!r}"
            )
    if config.get("attention_relax", -1.0) not in (-1, -1.0, 0, None):
        raise ValueError(f"{source} has attention_relax={config['attention_relax']!r}; unsupported")
    required = [key for key, _, default in _SIZES if default is None] + list(_CONV_KEYS)
    if missing := [key for key in required if key not in config]:
        raise ValueError(f"{source} lacks {', '.join(missing)}")
    conv = [config[key] for key in _CONV_KEYS]
    count = config.get("num_feat_extract_layers", len(conv[0]))
    if not all(isinstance(values, list) and len(values) == count for values in conv):
        raise ValueError(
            f"{source}: conv_dim, conv_kernel and conv_stride must be lists of "
            f"num_feat_extract_layers={count!r} values"
        )
    layers = [
        tuple(_positive_int(source, key, v) for key, v in zip(_CONV_KEYS, layer)) for layer in zip(*conv)
    ]
    eps = config.get("layer_norm_eps", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
        raise ValueError(f"{source}: layer_norm_eps={eps!r} is not a positive number")
    cfg = MertConfig.from_dict(config.get("culturemert", {}), f"{source}, culturemert")
    if cfg.conv_layers != layers:
        cfg.conv_feature_layers = repr(layers)
    cfg.conv_bias = _boolean(source, "conv_bias", config.get("conv_bias", False))
    for key, name, default in _SIZES:
        setattr(cfg, name, _positive_int(source, key, config.get(key, default)))
    cfg.layer_norm_first = _boolean(source, "do_stable_layer_norm", config.get("do_stable_layer_norm", False))
    cfg.layer_norm_eps = float(eps)
    cfg.check(source)
    return cfg


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone tensors under HF names; the pre-training heads are left out."""
    converted = {}
    for key, value in state.items():
        hf_key = fairseq_key_to_hf(key)
        if hf_key is not None:
            converted[hf_key] = value
    return converted
