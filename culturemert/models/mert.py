"""MERT: a HuBERT-style music encoder with acoustic (EnCodec) and musical (CQT) heads.

Architecture of MERT-v1-95M (thesis 3.2): a 7-layer convolutional feature
extractor (320x down-sampling: 24 kHz audio -> 75 frames/s), layer norm and projection to the
transformer width, a grouped convolutional positional embedding, and a 12-layer transformer
encoder. Pre-training heads: ``final_proj`` and the codeword embeddings ``label_embs_concat``
score the 8 EnCodec codebooks by cosine similarity; ``encoder_cqt_model.fc`` regresses the CQT
frame. Parameter names equal those of the released fairseq checkpoint, so it loads as is.
"""

import torch
import torch.nn.functional as F
from fairseq.models import BaseFairseqModel, register_model
from fairseq.models.wav2vec.wav2vec2 import ConvFeatureExtractionModel
from fairseq.modules import GradMultiply
from omegaconf import OmegaConf
from torch import nn
from torch.utils.checkpoint import checkpoint

from culturemert.masking import span_mask
from culturemert.models.config import MertConfig, conv_output_lengths
from culturemert.models.extractor import extractor_features, is_default_mode


class WeightNormConv1d(nn.Module):
    """Grouped 1-D convolution with weight normalisation over dim 2, fairseq's parameter names
    (``weight_g`` [1, 1, K], ``weight_v``, ``bias``); 'same' output length for even kernels."""

    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__()
        weight = torch.empty(channels, channels // groups, kernel_size)
        nn.init.normal_(weight, mean=0.0, std=(4.0 / (kernel_size * channels)) ** 0.5)
        self.weight_g = nn.Parameter(weight.norm(dim=(0, 1), keepdim=True))
        self.weight_v = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(channels))
        self.kernel_size = kernel_size
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
        x = F.conv1d(x, weight, self.bias, padding=self.kernel_size // 2, groups=self.groups)
        return x[:, :, :-1] if self.kernel_size % 2 == 0 else x


class SelfAttention(nn.Module):
    """Multi-head self-attention through PyTorch's fused scaled-dot-product kernel; the query, key
    and value projections run as one matrix product, and the heads are laid out contiguously
    for the kernel (faster on the CPU than strided views; equal within float32 rounding)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
        batch, frames, dim = x.shape
        projections = (self.q_proj, self.k_proj, self.v_proj)
        qkv = F.linear(
            x, torch.cat([p.weight for p in projections]), torch.cat([p.bias for p in projections])
        )
        heads = qkv.view(batch, frames, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = heads.contiguous()
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attend, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, frames, dim))


class TransformerLayer(nn.Module):
    """One encoder layer, post-LN (MERT-v1 release) or pre-LN (``layer_norm_first``)."""

    def __init__(self, cfg: MertConfig):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.layer_norm_first = cfg.layer_norm_first
        self.self_attn = SelfAttention(dim, cfg.encoder_attention_heads, cfg.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(dim, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.activation_dropout = nn.Dropout(cfg.activation_dropout)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.activation_dropout(F.gelu(self.fc1(x)))))

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
        if self.layer_norm_first:
            x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), attend))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x, attend)))
        return self.final_layer_norm(x + self.feed_forward(x))


def run_block(block: nn.Module, recompute: bool, *inputs: torch.Tensor | None) -> torch.Tensor:
    """``block(*inputs)``; with ``recompute`` (activation checkpointing) its activations are not
    kept but recomputed in the backward pass, with the RNG state of the forward restored so
    that dropout draws the same masks: the gradients equal those of the plain call."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(block, *inputs, use_reentrant=False, preserve_rng_state=True)
    return block(*inputs)


class TransformerEncoder(nn.Module):
    """Positional conv, layer norm and the layer stack; returns all hidden states (thesis 3.2)."""

    def __init__(self, cfg: MertConfig):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.layer_norm_first = cfg.layer_norm_first
        self.layerdrop = cfg.encoder_layerdrop
        self.checkpoint_activations = cfg.checkpoint_activations
        self.pos_conv = nn.Sequential(WeightNormConv1d(dim, cfg.conv_pos, cfg.conv_pos_groups), nn.GELU())
        self.layer_norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.encoder_layers))

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> list[torch.Tensor]:
        """``x`` [B, T, C]; ``padding_mask`` [B, T] (True = padding) -> ``layers + 1`` tensors.

        Entry 0 is the transformer input (after the positional conv, and after the layer norm
        in post-LN); entry i is layer i's output, as transformers >= 5 ``HubertModel`` returns
        them. In pre-LN the encoder's final output is ``layer_norm(hidden_states[-1])``
        (``final_output``); transformers 4.x reported that normed tensor as the last entry.
        """
        attend = None
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
            attend = ~padding_mask[:, None, None, :]
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        hidden_states = [x]
        recompute = self.training and self.checkpoint_activations
        for layer in self.layers:
            # Layerdrop is drawn outside the checkpoint: a recomputation never re-draws it.
            skipped = self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop
            if not skipped:
                x = run_block(layer, recompute, x, attend)
            hidden_states.append(x)
        return hidden_states

    def final_output(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """The encoder output fed to the pre-training heads."""
        last = hidden_states[-1]
        return self.layer_norm(last) if self.layer_norm_first else last


class CQTHead(nn.Module):
    """The musical head: one linear map from a frame to its CQT magnitudes (thesis eq. 3.3)."""

    def __init__(self, dim: int, bins: int):
        super().__init__()
        self.fc = nn.Linear(dim, bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@register_model("mert", dataclass=MertConfig)
class MertModel(BaseFairseqModel):
    """MERT encoder plus pre-training heads; see the module docstring."""

    def __init__(self, cfg: MertConfig):
        super().__init__()
        if not isinstance(cfg, MertConfig):  # fairseq passes an omegaconf DictConfig
            cfg = MertConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))
        self.cfg = cfg
        dim = cfg.encoder_embed_dim
        conv_layers = cfg.conv_layers
        self.feature_extractor = ConvFeatureExtractionModel(
            conv_layers=conv_layers, dropout=0.0, mode="default", conv_bias=cfg.conv_bias
        )
        conv_dim = conv_layers[-1][0]
        self.layer_norm = nn.LayerNorm(conv_dim, eps=cfg.layer_norm_eps)
        self.post_extract_proj = nn.Linear(conv_dim, dim)
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.mask_emb = nn.Parameter(torch.empty(dim).uniform_())
        self.encoder = TransformerEncoder(cfg)
        self.final_proj = nn.Linear(dim, cfg.final_dim * cfg.num_codebooks)
        self.label_embs_concat = nn.Parameter(
            torch.empty(cfg.num_codebooks * cfg.codeword_rows, cfg.final_dim).uniform_()
        )
        self.encoder_cqt_model = CQTHead(dim, cfg.cqt_bins)

    @classmethod
    def build_model(cls, cfg: MertConfig, task=None) -> "MertModel":
        return cls(cfg)

    def frame_padding_mask(self, padding_mask: torch.Tensor | None, num_frames: int):
        """Sample-level padding mask [B, samples] -> frame-level [B, num_frames] (True = pad).

        A frame is valid when the conv stack's arithmetic on the clip's unpadded length
        produces it, as in transformers' ``_get_feature_vector_attention_mask``.
        """
        if padding_mask is None:
            return None
        valid = conv_output_lengths((~padding_mask).sum(dim=1), self.cfg.conv_layers)
        return torch.arange(num_frames, device=padding_mask.device)[None, :] >= valid[:, None]

    def forward(
        self,
        source: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        mask: bool = True,
    ) -> dict[str, torch.Tensor | list[torch.Tensor] | None]:
        """Encode audio ``source`` [B, samples] at 24 kHz.

        Returns ``x`` (last hidden state [B, T, C]), ``hidden_states`` (list of
        ``encoder_layers + 1`` tensors), ``padding_mask`` and ``mask_indices`` ([B, T] bools or
        None) and ``features_pen`` (mean squared conv feature, the release's feature penalty).
        With ``mask`` the masked frames' inputs are replaced by ``mask_emb`` (thesis 3.2).
        """
        features = self.conv_features(source)
        if self.training and self.cfg.feature_grad_mult != 1.0:
            features = GradMultiply.apply(features, self.cfg.feature_grad_mult)
        features_pen = features.float().pow(2).mean()
        features = self.layer_norm(features.transpose(1, 2))
        batch, num_frames, _ = features.shape
        frame_padding = self.frame_padding_mask(padding_mask, num_frames)

        x = self.dropout_input(self.post_extract_proj(features))
        mask_indices = None
        if mask:
            valid = torch.full((batch,), num_frames, device=x.device)
            if frame_padding is not None:
                valid = (~frame_padding).sum(dim=1)
            mask_indices = span_mask(valid, num_frames, self.cfg.mask_prob, self.cfg.mask_length)
            x = torch.where(mask_indices[..., None], self.mask_emb.to(x.dtype), x)

        hidden_states = self.encoder(x, frame_padding)
        return {
            "x": self.encoder.final_output(hidden_states),
            "hidden_states": hidden_states,
            "padding_mask": frame_padding,
            "mask_indices": mask_indices,
            "features_pen": features_pen,
        }

    def conv_features(self, source: torch.Tensor) -> torch.Tensor:
        """The conv extractor's output [B, C, T] for ``source`` [B, samples]; block by block, so
        that ``checkpoint_activations`` keeps only each block's input in training."""
        recompute = self.training and self.cfg.checkpoint_activations
        x = source[:, None, :]
        for block in self.feature_extractor.conv_layers:
            x = run_block(block, recompute, x)
        return x

    def hidden_states(
        self, wav: torch.Tensor, padding_mask: torch.Tensor | None = None, layers: int | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Hidden states 0..``layers`` [B, frames, C] used for probing (thesis 3.2, 3.5.2); all
        ``encoder_layers + 1`` by default.

        ``wav`` [B, samples] float audio at 24 kHz; ``padding_mask`` [B, samples], True where a
        sample is padding. No masking. In eval mode without padding this is `inference_states`
        (no pre-training work, no layers above ``layers``); otherwise the training ``forward``.
        """
        if not self.training and padding_mask is None:
            return self.inference_states(wav, layers)
        states = self.forward(wav, padding_mask, mask=False)["hidden_states"]
        return tuple(states if layers is None else states[: layers + 1])

    def inference_conv_features(self, wav: torch.Tensor) -> torch.Tensor:
        """``feature_extractor(wav).transpose(1, 2)`` [B, frames, C] (channels last) in eval mode:
        on the CPU by `extractor_features` in fairseq's "default" mode, else by the extractor
        itself (on CUDA cuDNN's convolutions are faster, and they follow autocast)."""
        if wav.device.type == "cpu" and is_default_mode(self.feature_extractor):
            return extractor_features(self.feature_extractor, wav)
        return self.feature_extractor(wav).transpose(1, 2)

    def inference_states(self, wav: torch.Tensor, layers: int | None = None) -> tuple[torch.Tensor, ...]:
        """Hidden states 0..``layers`` of ``wav`` [B, samples] (all by default) in eval mode: the
        states of ``forward(wav, mask=False)`` without the pre-training work (feature penalty,
        masking, heads, padding) and without the layers above ``layers``."""
        if self.training:
            raise RuntimeError("inference_states needs model.eval()")
        layers = self.cfg.encoder_layers if layers is None else layers
        if not 0 <= layers <= self.cfg.encoder_layers:
            raise ValueError(f"layers={layers}: choose 0..{self.cfg.encoder_layers}")
        encoder = self.encoder
        x = self.post_extract_proj(self.layer_norm(self.inference_conv_features(wav)))
        x = x + encoder.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not encoder.layer_norm_first:
            x = encoder.layer_norm(x)
        states = [x]
        for layer in encoder.layers[:layers]:
            states.append(layer(states[-1], None))
        return tuple(states)

    def codeword_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine-similarity logits [N, codebooks, codeword_rows] in float32 for frames ``x`` [N, C].

        logit = cos(final_proj(x)_k, e_{k,v}) / logit_temp for codebook k and row v (thesis
        eq. 3.2); one normalised matrix product per codebook, equal to fairseq's broadcast
        cosine in ``compute_nce``. Computed outside autocast, in the heads' own precision.
        """
        cfg = self.cfg
        with torch.autocast(x.device.type, enabled=False):
            projected = self.final_proj(x.to(self.final_proj.weight.dtype))
            projected = projected.view(-1, cfg.num_codebooks, cfg.final_dim)
            codewords = self.label_embs_concat.view(cfg.num_codebooks, cfg.codeword_rows, cfg.final_dim)
            projected = F.normalize(projected.float(), dim=-1, eps=1e-8)
            codewords = F.normalize(codewords.float(), dim=-1, eps=1e-8)
            return torch.einsum("nkd,kvd->nkv", projected, codewords) / cfg.logit_temp

    def cqt_prediction(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted CQT magnitudes [..., cqt_bins] in float32 for frames ``x`` [..., C];
        computed outside autocast, in the head's own precision."""
        head = self.encoder_cqt_model
        with torch.autocast(x.device.type, enabled=False):
            return head(x.to(head.fc.weight.dtype)).float()
