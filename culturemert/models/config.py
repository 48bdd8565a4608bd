"""The MERT model's configuration (thesis 3.2): `MertConfig`, whose defaults are MERT-v1-95M and
whose values read from a file are checked (`MertConfig.from_dict`, `ModelConfigError`), and the
arithmetic of its conv stack (fairseq's notation, parsed without ``eval``; output lengths)."""

import ast
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from fairseq.dataclass import FairseqDataclass

from culturemert.errors import UserError


class ModelConfigError(UserError):
    """A model configuration (a YAML, or one stored in a checkpoint) that cannot make a MERT model."""


DEFAULT_CONV = "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"  # MERT-v1-95M's conv stack


@dataclass
class MertConfig(FairseqDataclass):
    """Hyper-parameters of the MERT model; defaults are MERT-v1-95M (thesis 3.2)."""

    conv_feature_layers: str = field(
        default=DEFAULT_CONV,
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
    def from_dict(cls, values: object, source: str = "model configuration") -> "MertConfig":
        """Config from saved fields (a checkpoint's, a model YAML's), checked with `check`; fields
        MertConfig does not have are ignored (the release stores task and loss settings beside
        the model's). A value that cannot make a model is a `ModelConfigError` naming ``source``."""
        if not isinstance(values, Mapping):
            raise ModelConfigError(
                f"{source}: holds a {type(values).__name__}, not a mapping of model fields"
            )
        names = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        cfg = cls(**{k: v for k, v in values.items() if k in names})
        cfg.check(source)
        return cfg

    # Fields whose values are probabilities, and the non-size integers that may be 0.
    PROBABILITIES = (
        "dropout",
        "attention_dropout",
        "activation_dropout",
        "dropout_input",
        "encoder_layerdrop",
        "mask_prob",
    )
    MAY_BE_ZERO = ("num_special_symbols",)

    def check(self, source: str = "model configuration") -> None:
        """Refuse values that cannot make a working MERT model, in one `ModelConfigError` line
        naming ``source`` and every bad field: booleans that are not booleans, integers that are
        not positive, numbers that are not finite (probabilities outside [0, 1], a non-positive
        ``layer_norm_eps`` or ``logit_temp``), attention heads or positional-conv groups that do
        not divide ``encoder_embed_dim``, and a ``conv_feature_layers`` `parse_conv_layers`
        refuses. Sizes are not bounded: a checkpoint reader compares them with its tensors."""
        problems: dict[str, str] = {}
        for f in dataclasses.fields(self):
            name, value = f.name, getattr(self, f.name)
            if name.startswith("_"):
                continue
            if f.type is bool and not isinstance(value, bool):
                problems[name] = "is not a boolean (true or false)"
            elif f.type is int and (isinstance(value, bool) or not isinstance(value, int)):
                problems[name] = "is not an integer"
            elif f.type is int and value < (0 if name in self.MAY_BE_ZERO else 1):
                problems[name] = (
                    f"is not a {'non-negative' if name in self.MAY_BE_ZERO else 'positive'} integer"
                )
            elif f.type is float and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            ):
                problems[name] = "is not a finite number"
            elif name in self.PROBABILITIES and not 0 <= value <= 1:
                problems[name] = "is not a probability in [0, 1]"
            elif name in ("layer_norm_eps", "logit_temp") and value <= 0:
                problems[name] = "is not positive"
        lines = [f"{name}={getattr(self, name)!r} {problem}" for name, problem in problems.items()]
        for name in ("encoder_attention_heads", "conv_pos_groups"):
            parts, width = getattr(self, name), self.encoder_embed_dim
            if not {name, "encoder_embed_dim"} & set(problems) and width % parts:
                lines.append(f"{name}={parts} does not divide encoder_embed_dim={width}")
        try:
            parse_conv_layers(self.conv_feature_layers)
        except ValueError as error:
            lines.append(str(error))
        if lines:
            raise ModelConfigError(f"{source}: " + "; ".join(lines))

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

    if not isinstance(spec, str):
        raise ValueError(
            f"conv_feature_layers is a {type(spec).__name__}, not a string such as {DEFAULT_CONV!r}"
        )
    shown = repr(spec if len(spec) <= 100 else spec[:100] + "...")

    def evaluate(node: ast.AST):
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = evaluate(node.left), evaluate(node.right)
            if isinstance(node.op, ast.Mult) and isinstance(left, int) != isinstance(right, int):
                sequence, count = (left, right) if isinstance(right, int) else (right, left)
                if len(sequence) * count > MAX_CONV_LAYERS:  # refused before it is built
                    raise ValueError(f"conv_feature_layers: more than {MAX_CONV_LAYERS} layers: {shown}")
            return left + right if isinstance(node.op, ast.Add) else left * right
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [evaluate(element) for element in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(
            f"conv_feature_layers={shown}: {ast.unparse(node)!r} is not allowed "
            "(only int tuples, lists, + and *)"
        )

    try:
        layers = evaluate(ast.parse(spec, mode="eval").body)
    except (SyntaxError, TypeError, RecursionError, MemoryError) as error:
        reason = error.msg if isinstance(error, SyntaxError) else str(error) or type(error).__name__
        raise ValueError(f"conv_feature_layers={shown} is not valid notation ({reason})") from None
    if (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(layer, tuple) and len(layer) == 3 for layer in layers)
        or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for layer in layers for n in layer
        )
    ):
        raise ValueError(
            f"conv_feature_layers must be a non-empty list of (dim, kernel, stride) positive "
            f"integers: {shown}"
        )
    return layers


def conv_output_lengths(lengths: torch.Tensor, conv_layers: list[tuple[int, int, int]]):
    """Frames produced by the valid (unpadded) convolutions for inputs of ``lengths`` samples."""
    for _, kernel, stride in conv_layers:
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
    return lengths
