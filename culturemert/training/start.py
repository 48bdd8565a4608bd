"""The start checkpoint of a run: INIT as published, made into the ``.pt`` fairseq starts from.

INIT is a fairseq ``.pt`` (ours, or the released ``MERT-v1-95M_fairseq.pt`` with its plain-dict
config, codeword blocks of 1,028 rows and nnAudio CQT kernel buffers) or an HF folder (thesis
3.2). It is read once: its configuration fixes the architecture of every stage, and its weights
are written with `save_fairseq` into the run folder. Derived buffers (the CQT kernels, which the
task recomputes) are dropped and logged; every learned tensor is kept or the start is refused.
An HF folder has no pre-training heads: they are freshly initialised, logged, and stage 1 then
trains them beside the CNN and the codeword embeddings (`trainable_patterns`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import torch
import yaml

from culturemert.checkpoint import (
    DERIVED_PREFIXES,
    CheckpointError,
    build_and_load,
    fresh_heads,
    read_fairseq,
    read_hf,
    save_fairseq,
)
from culturemert.fingerprint import file_sha256
from culturemert.hf_format import HEAD_PREFIXES
from culturemert.models.config import ModelConfigError
from culturemert.models.mert import MertConfig, MertModel
from culturemert.training.fingerprint import sha256_files

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Start:
    """What a run starts from: the architecture, the weights, and the names of the tensors that
    were freshly initialised for it (the heads of an HF folder)."""

    cfg: MertConfig
    state: dict[str, torch.Tensor]
    fresh: list[str]

    def trainable_patterns(self) -> list[str]:
        """Parameter patterns stage 1 adds to its own: the fresh heads (none from a ``.pt``)."""
        return [
            re.escape(prefix) + ".*"
            for prefix in HEAD_PREFIXES
            if any(n.startswith(prefix) for n in self.fresh)
        ]

    def write(self, out: Path) -> None:
        """Write the start checkpoint, unless a rerun of the same fingerprint already did."""
        if not out.exists():
            save_fairseq(out, self.cfg, self.state)


def identify(init: Path) -> dict:
    """Content hash of INIT for the run's fingerprint: the file, or an HF folder's config.json
    and weights."""
    if init.is_dir():
        files = [init / name for name in ("config.json", "model.safetensors", "pytorch_model.bin")]
        return {"path": str(init), "sha256": sha256_files([f for f in files if f.is_file()], init)}
    if not init.is_file():
        raise CheckpointError(
            f"start checkpoint {init} not found: get MERT-v1-95M_fairseq.pt (README, 'Weights') or set INIT "
            "to a fairseq .pt or a Hugging Face folder"
        )
    return {"path": str(init), "sha256": file_sha256(init)}


def read_model_yaml(config: Path) -> MertConfig:
    """The MertConfig of a model YAML (configs/model/*.yaml), checked as a checkpoint's stored
    configuration is (`MertConfig.from_dict`); a `ModelConfigError` names the file and the key."""
    try:
        values = yaml.safe_load(config.read_text())
    except FileNotFoundError:
        raise ModelConfigError(f"{config}: no such model YAML") from None
    except IsADirectoryError:
        raise ModelConfigError(f"{config}: a folder, not a model YAML (configs/model/*.yaml)") from None
    except OSError as error:
        raise ModelConfigError(f"{config}: cannot be read ({error.strerror})") from None
    except UnicodeDecodeError:
        raise ModelConfigError(f"{config}: not a text file, so not a model YAML") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ModelConfigError(f"{config}: not valid YAML ({problem}{where})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ModelConfigError(f"{config}: holds a {type(values).__name__}, not a mapping of model fields")
    names = {f.name for f in dataclasses.fields(MertConfig)}
    if unknown := sorted(str(key) for key in values if key not in names):
        raise ModelConfigError(f"{config}: unknown model fields {', '.join(unknown)}")
    return MertConfig.from_dict(values, str(config))


def random_start(config: Path, seed: int) -> Start:
    """A randomly initialised MERT of a model YAML (configs/model/*.yaml), read with
    `read_model_yaml`: a file that cannot make a model is refused before anything is built."""
    cfg = read_model_yaml(config)
    torch.manual_seed(seed)
    return Start(cfg, MertModel(cfg).state_dict(), [])


def load_start(init: Path, seed: int = 0) -> Start:
    """INIT read once: derived buffers dropped (logged), fresh heads for an HF folder (seeded,
    logged), and every key and shape checked against the model it describes."""
    if init.is_dir():
        cfg, state = read_hf(init)
        heads = fresh_heads(cfg, seed)
        logger.info(
            "%s is an HF folder without pre-training heads: initialised %s; stage 1 trains them",
            init,
            ", ".join(sorted(heads)),
        )
        state, fresh = {**state, **heads}, sorted(heads)
    else:
        cfg, state = read_fairseq(init, mmap=True)
        derived = sorted(k for k in state if k.startswith(DERIVED_PREFIXES))
        if derived:
            logger.info(
                "%s: dropped derived buffers (the task recomputes them): %s", init, ", ".join(derived)
            )
        state, fresh = {k: v for k, v in state.items() if k not in derived}, []
    build_and_load(str(init), cfg, state)
    return Start(cfg, state, fresh)
