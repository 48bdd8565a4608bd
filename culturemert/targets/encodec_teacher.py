"""The acoustic teacher of MERT: frozen EnCodec 24 kHz tokens at 6 kbps (thesis eq. 3.1).

At 6 kbps EnCodec's residual vector quantiser uses its first 8 stages, so every 320-sample hop
(75 frames/s at 24 kHz) gets 8 codes, each one of 1,024 codewords.

Frame alignment. Code j covers samples [320 j, 320 (j + 1)); `codes` zero-pads the end of a clip
to a whole number of hops, so n samples give ceil(n / 320) frames (375 for 5 s). The encoder is
causal: code j depends only on samples before 320 (j + 1), so a crop starting at sample 320 f
maps to codes [f, f + n) of the clip it was cut from, except for its first frames, which EnCodec
computes from reflection padding and a fresh LSTM state instead of the audio before the crop
(measured on the data-initialised teacher: the first 16-24 frames, about 0.3 s; later codes agree
but for rare float32 near-ties).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from culturemert.audio import FRAME_RATE, HOP_LENGTH
from culturemert.compat import import_encodec
from culturemert.errors import UserError
from culturemert.files import write_atomically
from culturemert.fingerprint import file_sha256

CHECKPOINT_NAME = "encodec_24khz-d7cc33bc.th"
CHECKPOINT_URL = f"https://dl.fbaipublicfiles.com/encodec/v0/{CHECKPOINT_NAME}"  # encodec's ROOT_URL
BANDWIDTH = 6.0
NUM_CODEBOOKS = 8
CODEBOOK_SIZE = 1024


class TeacherError(UserError):
    """A teacher that cannot be built; the message names the file or input and the fix."""


class MissingWeightsError(TeacherError, FileNotFoundError):
    """The EnCodec checkpoint is not where it was said to be; the message says what to download."""


class EncodecTeacher(nn.Module):
    """Frozen EnCodec encoder + quantiser mapping 24 kHz audio to [B, frames, 8] codes.

    Build it with `from_checkpoint` (the published EnCodec, as MERT) or `from_data` (an untrained
    stand-in with data-initialised codebooks, for tests and offline demos). `identity` describes
    which teacher it is, so a token cache can record and check where its codes came from.
    """

    def __init__(self, model: nn.Module, identity: dict[str, str | int]) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.quantizer = model.quantizer
        self.identity = identity
        self.eval()
        self.requires_grad_(False)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> EncodecTeacher:
        """Load the published EnCodec 24 kHz weights (`CHECKPOINT_NAME`, from `CHECKPOINT_URL`)."""
        path = Path(path)
        if not path.is_file():
            raise MissingWeightsError(
                f"{path}: EnCodec weights not found; download {CHECKPOINT_URL} and pass the path of "
                f"{CHECKPOINT_NAME} (for example weights/{CHECKPOINT_NAME})"
            )
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
            model = import_encodec().EncodecModel.encodec_model_24khz(pretrained=False)
            model.load_state_dict(state_dict)
        except Exception as err:
            raise TeacherError(
                f"{path}: not the EnCodec 24 kHz checkpoint ({type(err).__name__}: {err}); "
                f"download {CHECKPOINT_URL} again"
            ) from err
        sha256 = file_sha256(path)
        return cls(model, {"codec": "encodec_24khz", "checkpoint": path.name, "sha256": sha256})

    @classmethod
    def from_data(cls, calibration_audio: torch.Tensor, seed: int) -> EncodecTeacher:
        """An untrained EnCodec whose 8 codebooks are drawn from its own outputs on real audio.

        For tests and offline demos: same architecture and cost as the real teacher, not its codes.
        The encoder keeps its seeded random initialisation, a fixed random projection of the
        waveform as in BEST-RQ and MusicFM; an untrained quantiser has all-zero codebooks and
        emits code 0 everywhere, so the codebooks come from data. The encoder runs once on
        `calibration_audio` ([B, samples], 24 kHz; at least 1,024 distinct frames, about 14 s,
        and 30 s or more in practice), then stage by stage:

        1. the stage's 1,024 codewords are calibration residuals drawn by k-means++ seeding (D^2
           sampling, Arthur & Vassilvitskii 2007). The random encoder's output is a large constant
           vector plus a small signal-dependent part; uniformly drawn codewords include
           near-duplicates whose near-ties flip under float32 rounding, D^2 sampling spreads them;
        2. each residual is quantised with the new codebook, a codeword's own frame with the
           codebook less that codeword, and what is left feeds the next stage. (Quantised by
           itself, a codeword's frame would leave an exactly zero residual, and every stage would
           lose 1,024 frames to sample from.)
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = import_encodec().EncodecModel.encodec_model_24khz(pretrained=False)
        calibration_audio = calibration_audio.detach().float().cpu()
        calibration = hashlib.sha256(calibration_audio.numpy().tobytes()).hexdigest()
        identity = {"codec": "encodec_24khz", "init": "from_data", "seed": seed, "calibration": calibration}
        teacher = cls(model, identity)
        teacher._init_codebooks(calibration_audio, np.random.default_rng(seed))
        return teacher

    def save(self, path: str | os.PathLike) -> None:
        """Write this teacher as an EnCodec 24 kHz checkpoint that `from_checkpoint` reads, so a
        data-initialised teacher gives the same codes to every manifest it is used on. The
        decoder, which a teacher never runs, is saved freshly initialised. Atomic."""
        model = import_encodec().EncodecModel.encodec_model_24khz(pretrained=False)
        model.encoder.load_state_dict(self.encoder.state_dict())
        model.quantizer.load_state_dict(self.quantizer.state_dict())
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda handle: torch.save(model.state_dict(), handle))

    @torch.no_grad()
    def _init_codebooks(self, calibration_audio: torch.Tensor, rng: np.random.Generator) -> None:
        """Set the first `NUM_CODEBOOKS` codebooks from calibration residuals (see from_data)."""
        embeddings = self.encoder(_pad_to_hops(calibration_audio)[:, None])
        residuals = torch.unique(embeddings.transpose(1, 2).flatten(0, 1), dim=0)
        if len(residuals) < CODEBOOK_SIZE:
            raise TeacherError(
                f"calibration audio gives {len(residuals)} distinct frames, {CODEBOOK_SIZE} are needed "
                f"({CODEBOOK_SIZE / FRAME_RATE:.0f} s of music or more)"
            )
        own_codeword = torch.arange(CODEBOOK_SIZE)
        for layer in self.quantizer.vq.layers[:NUM_CODEBOOKS]:
            chosen = _d2_sample(residuals, CODEBOOK_SIZE, rng)
            codebook = residuals[chosen]
            layer._codebook.embed.copy_(codebook)
            layer._codebook.inited.fill_(1.0)
            scores = 2 * residuals @ codebook.T - codebook.pow(2).sum(1)  # EnCodec's distance, negated
            scores[chosen, own_codeword] = -torch.inf
            residuals = residuals - codebook[scores.argmax(1)]

    @torch.no_grad()
    def codes(self, wav: torch.Tensor) -> torch.Tensor:
        """int64 codes [B, ceil(samples / 320), 8] of a [B, samples] 24 kHz float waveform.

        Runs on the module's device and returns on `wav`'s. The end of the clip is zero-padded to
        a whole hop (EnCodec itself would reflect it), so clips zero-padded to a common length in
        a batch get the codes they get alone; only float32 rounding, which differs with the batch
        shape, can flip a rare near-tie. Memory grows with the length: `token_cache` splits long
        audio.
        """
        if wav.dim() != 2:
            raise ValueError(f"expected a [batch, samples] waveform, got shape {tuple(wav.shape)}")
        device = next(self.encoder.parameters()).device
        embeddings = self.encoder(_pad_to_hops(wav.float()).to(device)[:, None])
        codes = self.quantizer.encode(embeddings, FRAME_RATE, BANDWIDTH)  # [8, B, frames]
        return codes.permute(1, 2, 0).to(wav.device)


def _pad_to_hops(wav: torch.Tensor) -> torch.Tensor:
    """Zero-pad the last dimension of `wav` to a multiple of `HOP_LENGTH`."""
    frames = math.ceil(wav.shape[-1] / HOP_LENGTH)
    return nn.functional.pad(wav, (0, frames * HOP_LENGTH - wav.shape[-1]))


def _d2_sample(points: torch.Tensor, num: int, rng: np.random.Generator) -> torch.Tensor:
    """Indices of `num` distinct rows of `points`, drawn by k-means++ seeding: the first uniformly,
    each next one with probability proportional to its squared distance to the nearest drawn."""
    centred = (points - points.mean(0)).double().numpy()  # float64, no common offset: exact distances
    norms = (centred**2).sum(1)
    chosen = [int(rng.integers(len(centred)))]
    nearest = np.full(len(centred), np.inf)  # squared distance to the nearest drawn row
    while len(chosen) < num:
        latest = chosen[-1]
        distances = norms - 2 * centred @ centred[latest] + norms[latest]
        np.minimum(nearest, np.maximum(distances, 0), out=nearest)
        nearest[latest] = 0
        chosen.append(int(rng.choice(len(centred), p=nearest / nearest.sum())))
    return torch.tensor(chosen)
