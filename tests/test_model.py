"""The MERT model against an independent implementation: transformers' HubertModel."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from transformers import HubertConfig, HubertModel

from culturemert import load_model
from culturemert.checkpoint import convert
from culturemert.hf_format import hf_config_from_mert
from culturemert.masking import span_mask
from culturemert.models.mert import MertConfig, MertModel, conv_output_lengths


def stock_hubert(cfg: MertConfig) -> HubertModel:
    config = {k: v for k, v in hf_config_from_mert(cfg).items() if k != "culturemert"}
    return HubertModel(HubertConfig(**config)).eval()


@pytest.mark.parametrize(
    "cfg",
    [tiny_config(), tiny_config(layer_norm_first=True), MertConfig()],
    ids=["tiny-post-ln", "tiny-pre-ln", "MERT-v1-95M"],
)
def test_hidden_states_equal_transformers_hubert(cfg, tmp_path, seeded):
    hubert = stock_hubert(cfg)
    hubert.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "model.pt")
    model = load_model(tmp_path / "model.pt")
    assert not model.training

    lengths = [120_000, 80_000]
    wav = torch.randn(2, max(lengths))
    padding = torch.arange(wav.shape[1])[None, :] >= torch.tensor(lengths)[:, None]
    wav = wav.masked_fill(padding, 0.0)
    with torch.no_grad():
        ours = model.hidden_states(wav, padding)
        theirs = hubert(wav, attention_mask=(~padding).long(), output_hidden_states=True)
    theirs = theirs.hidden_states
    assert len(ours) == len(theirs) == cfg.encoder_layers + 1
    valid = ~model.frame_padding_mask(padding, ours[0].shape[1])
    assert valid.sum(dim=1).tolist() == [374, 249]
    for layer, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == (2, 374, cfg.encoder_embed_dim)
        error = (a - b).abs()[valid].max().item()
        assert error < 1e-4, f"hidden state {layer} differs by {error}"


def test_five_seconds_give_374_frames():
    lengths = torch.tensor([120_000, 72_000, 400])
    assert conv_output_lengths(lengths, MertConfig().conv_layers).tolist() == [374, 224, 1]
    model = MertModel(tiny_config()).eval()
    with torch.no_grad():
        states = model.hidden_states(torch.randn(1, 120_000))
    assert states[0].shape == (1, 374, 64)


def test_masked_frames_take_the_mask_embedding(seeded):
    model = MertModel(tiny_config(encoder_layers=0)).eval()
    model.encoder.pos_conv[0].weight_g.data.zero_()
    model.encoder.pos_conv[0].bias.data.fill_(-10.0)  # GELU(-10) ~ 0: no positional term
    model.encoder.layer_norm = torch.nn.Identity()
    wav = torch.randn(2, 24_000)
    out = model(wav, mask=True)
    masked = out["mask_indices"]
    assert masked.any() and (~masked).any()
    expected = model.mask_emb.expand(int(masked.sum()), -1)
    assert torch.allclose(out["x"][masked], expected, atol=1e-5)
    unmasked = model(wav, mask=False)["x"]
    assert torch.allclose(out["x"][~masked], unmasked[~masked], atol=1e-5)


def test_span_mask_spans_and_padding():
    generator = torch.Generator().manual_seed(3)
    lengths = torch.tensor([374, 200])
    mask = span_mask(lengths, 374, mask_prob=0.8, span=5, generator=generator)
    assert not mask[1, 200:].any()
    # Every run of masked frames is at least one span long.
    for row, length in zip(mask, lengths.tolist()):
        runs = torch.diff(torch.cat([torch.tensor([0]), row[:length].int(), torch.tensor([0])]))
        starts, ends = (runs == 1).nonzero().flatten(), (runs == -1).nonzero().flatten()
        assert ((ends - starts) >= 5).all()
    # Overlapping spans: expected masked share 1 - (1 - p/L)^L ~ 0.56 at p = 0.8, L = 5.
    many = span_mask(torch.full((256,), 374), 374, 0.8, 5, generator=generator)
    assert 0.50 < many.float().mean().item() < 0.62
    again = span_mask(lengths, 374, 0.8, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, mask)


def test_codeword_logits_are_cosines_over_temperature(seeded):
    model = MertModel(tiny_config())
    x = torch.randn(5, 64)
    logits = model.codeword_logits(x)
    cfg = model.cfg
    assert logits.shape == (5, cfg.num_codebooks, cfg.codeword_rows)
    projected = model.final_proj(x).view(5, cfg.num_codebooks, cfg.final_dim)
    codewords = model.label_embs_concat.view(cfg.num_codebooks, cfg.codeword_rows, cfg.final_dim)
    k, v, n = 3, 17, 2
    cosine = torch.nn.functional.cosine_similarity(projected[n, k], codewords[k, v], dim=0)
    assert torch.isclose(logits[n, k, v], cosine / 0.1, atol=1e-5)
