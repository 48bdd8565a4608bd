"""The MERT model's configuration (thesis 3.2): `MertConfig`, whose defaults are MERT-v1-95M, and
the arithmetic of its conv stack (fairseq's notation, parsed without ``eval``; output lengths)."""

import ast
import dataclasses
from dataclasses import dataclass, field

import torch
from fairseq.dataclass import FairseqDataclass


@dataclass
class MertConfig(FairseqDataclass):
    """Hyper-parameters of the MERT model; defaults are MERT-v1-95M (thesis 3.2)."""

    conv_feature_layers: str = field(
        default="[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
        metadata={"help": "conv stack as a python list of (channels, kernel, stride)"},
    )
    conv_bias: bool = field(default=False, metadata={"help": "bias in the conv layers"})
    encoder_layers: int = field(default=12, metadata={"help": "transformer layers"})
    encoder_embed_dim: int = field(default=768, metadata={"help": "transformer width"})
    encoder_ffn_embed_dim: int = field(default=3072, metadata={"help": "feed-forward width"})
    encoder_attention_heads: int = field(default=12, metadata={"help": "attention heads"})
    layer_norm_first: bool = field(
        default=False,
        metadata={"help": "pre-LN transformer; the released MERT-v1-95M is post-LN (false)"},
    )
    layer_norm_eps: float = field(default=1e-5, metadata={"help": "epsilon of every LayerNorm"})
    conv_pos: int = field(default=128, metadata={"help": "positional conv kernel size"})
    conv_pos_groups: int = field(default=16, metadata={"help": "positional conv groups"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in the transformer"})
    attention_dropout: float = field(default=0.1, metadata={"help": "dropout on attention"})
    activation_dropout: float = field(default=0.0, metadata={"help": "dropout after the FFN"})
    dropout_input: float = field(default=0.1, metadata={"help": "dropout on projected features"})
    encoder_layerdrop: float = field(default=0.05, metadata={"help": "probability to skip a layer"})
    feature_grad_mult: float = field(
        default=0.1, metadata={"help": "scale of the gradient flowing into the conv extractor"}
    )
    mask_prob: float = field(default=0.8, metadata={"help": "span-start probability per frame"})
    mask_length: int = field(default=5, metadata={"help": "masked span length in frames"})
    num_codebooks: int = field(default=8, metadata={"help": "EnCodec codebooks predicted"})
    codebook_size: int = field(default=1024, metadata={"help": "codes per codebook"})
    num_special_symbols: int = field(
        default=4,
        metadata={
            "help": "rows before the codes in each codeword block (the release's fairseq "
            "Dictionary adds <s>, <pad>, </s>, <unk>: code c is row c + 4)"
        },
    )
    final_dim: int = field(default=64, metadata={"help": "codeword embedding size"})
    logit_temp: float = field(default=0.1, metadata={"help": "cosine-logit temperature"})
    cqt_bins: int = field(default=336, metadata={"help": "CQT bins regressed by the head"})
    checkpoint_activations: bool = field(
        default=False,
        metadata={
            "help": "in training, keep only each conv block's and transformer layer's input and "
            "recompute the rest in the backward pass: less memory, the same loss and gradients"
        },
    )

    @property
    def conv_layers(self) -> list[tuple[int, int, int]]:
        return parse_conv_layers(self.conv_feature_layers)

    @classmethod
    def from_dict(cls, values: dict) -> "MertConfig":
        """Config from a checkpoint's saved fields; fields MertConfig does not have are ignored
        (the release stores task and loss settings beside the model's)."""
        names = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        return cls(**{k: v for k, v in values.items() if k in names})

    BACKBONE_ARCHITECTURE = (
        "conv_feature_layers",
        "conv_bias",
        "encoder_layers",
        "encoder_embed_dim",
        "encoder_ffn_embed_dim",
        "encoder_attention_heads",
        "layer_norm_first",
        "layer_norm_eps",  # shapes no parameter, but changes every normalised activation
        "conv_pos",
        "conv_pos_groups",
    )
    HEAD_ARCHITECTURE = ("num_codebooks", "codebook_size", "num_special_symbols", "final_dim", "cqt_bins")

    def architecture(self, heads: bool = True) -> dict:
        """The fields that shape the parameters (of the backbone, and of the pre-training heads
        with ``heads``); training settings (dropouts, masking) are left out."""
        names = self.BACKBONE_ARCHITECTURE + (self.HEAD_ARCHITECTURE if heads else ())
        return {name: getattr(self, name) for name in names}

    @property
    def codeword_rows(self) -> int:
        """Rows of one codebook's block in ``label_embs_concat``."""
        return self.codebook_size + self.num_special_symbols


MAX_CONV_LAYERS = 1000


def parse_conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """Evaluate fairseq's conv-stack notation, e.g. ``"[(512,10,5)] + [(512,3,2)] * 4"``,
    allowing only int tuples, lists, ``+`` and ``*`` (no ``eval`` of config strings)."""

    def evaluate(node: ast.AST):
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = evaluate(node.left), evaluate(node.right)
            if isinstance(node.op, ast.Mult) and isinstance(left, int) != isinstance(right, int):
                sequence, count = (left, right) if isinstance(right, int) else (right, left)
                if len(sequence) * count > MAX_CONV_LAYERS:  # refused before it is built
                    raise ValueError(f"conv_feature_layers: more than {MAX_CONV_LAYERS} layers: {spec!r}")
            return left + right if isinstance(node.op, ast.Add) else left * right
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [evaluate(element) for element in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(f"conv_feature_layers: unsupported expression {ast.dump(node)}")

    layers = evaluate(ast.parse(spec, mode="eval").body)
    if not isinstance(layers, list) or not all(
        isinstance(layer, tuple) and len(layer) == 3 for layer in layers
    ):
        raise ValueError(f"conv_feature_layers must be a list of (dim, kernel, stride): {spec!r}")
    return layers


def conv_output_lengths(lengths: torch.Tensor, conv_layers: list[tuple[int, int, int]]):
    """Frames produced by the valid (unpadded) convolutions for inputs of ``lengths`` samples."""
    for _, kernel, stride in conv_layers:
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
    return lengths
