"""The MLP probe of the MARBLE protocol on cached features (thesis 3.5.2, App. A.2).

Input: one layer's mean-pooled chunk features, or all layers mixed by learnable softmax weights
(initialised equal; MARBLE draws them at random). Head: Linear(dim, 512), ReLU, dropout 0.2,
Linear(512, tags), trained with BCE-with-logits on the chunks of the training recordings (each
chunk carries its recording's tags), Adam (0.9, 0.999, 1e-8), batch 64, ReduceLROnPlateau
(MARBLE's factor 0.5, patience 3) and early stopping (patience 10) on validation ROC-AUC, at most
100 epochs; the weights of the best validation epoch are kept. Features are used as extracted,
without standardisation, as in MARBLE, unless ``standardize`` z-scores every feature with the
mean and standard deviation of the training chunks (for models whose features vary little
between recordings, such as the demo's tiny ones). Validation and test score a recording by the sigmoid of
the mean of its chunks' logits (MARBLE's per-track scatter-mean of the chunk outputs).

Selection: the learning rate is the one of `LEARNING_RATES` whose seed-0 probe reaches the best
validation ROC-AUC (ties go to the smaller rate); every seed then trains with it, seed 0 reusing
the search's probe. The test split is only scored, after all choices are made. Results: the
metrics of each seed, and their mean and sample standard deviation (ddof 1) over the seeds.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import expit
from torch import nn
from tqdm import tqdm

from culturemert.errors import UserError
from culturemert.files import write_atomically, write_json_atomically
from culturemert.probing.feature_cache import FeatureCache
from culturemert.probing.metrics import (
    METRICS,
    average_by_recording,
    evaluable_tags,
    macro_roc_auc,
    tagging_metrics,
)

logger = logging.getLogger(__name__)

LEARNING_RATES = (5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2)
ALL_LAYERS = "all"
PREDICT_BATCH = 4096


class ProbeError(UserError):
    """Features a probe cannot be fit on; the message names the cache and the problem."""


@dataclass(frozen=True)
class ProbeConfig:
    """Hyper-parameters of the probe and its training (defaults: thesis 3.5.2, App. A.2)."""

    hidden: int = 512
    dropout: float = 0.2
    batch_size: int = 64
    max_epochs: int = 100
    lr_patience: int = 3
    lr_factor: float = 0.5
    early_stopping_patience: int = 10
    learning_rates: tuple[float, ...] = LEARNING_RATES
    seeds: int = 5
    standardize: bool = False


class ProbeMLP(nn.Module):
    """One hidden layer of `hidden` units on [batch, dim] features, or on [batch, layers, dim]
    features mixed by softmax weights over `layers` when it is given."""

    def __init__(self, dim: int, tags: int, config: ProbeConfig, layers: int | None = None):
        super().__init__()
        self.layer_logits = nn.Parameter(torch.zeros(layers)) if layers is not None else None
        self.head = nn.Sequential(
            nn.Linear(dim, config.hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, tags),
        )

    def layer_weights(self) -> torch.Tensor | None:
        return None if self.layer_logits is None else torch.softmax(self.layer_logits, dim=0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.layer_logits is not None:
            features = torch.einsum("l,bld->bd", self.layer_weights(), features)
        return self.head(features)


@dataclass
class ProbeData:
    """The chunk features of one layer choice (float16 on `device`), the chunk labels, and each
    split's chunk indices, recording rows and recording labels."""

    features: torch.Tensor
    chunk_labels: torch.Tensor
    chunk_recording: np.ndarray
    chunks: dict[str, torch.Tensor]
    rows: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]

    @classmethod
    def from_cache(cls, cache: FeatureCache, layer: int | str, device: torch.device) -> ProbeData:
        layers = cache.meta["layers"]
        if layer == ALL_LAYERS:
            selected = np.array(cache.features, dtype=np.float16)
        elif isinstance(layer, int) and 0 <= layer < layers:
            selected = np.array(cache.features[:, layer], dtype=np.float16)
        else:
            raise ProbeError(f"layer {layer!r}: choose 0..{layers - 1} or {ALL_LAYERS!r} for {cache.path}")
        if not np.isfinite(selected).all():
            raise ProbeError(
                f"{cache.path}: {int((~np.isfinite(selected)).sum())} feature values are NaN or infinite; "
                "re-extract the cache with probe.py extract (it refuses non-finite features)"
            )
        splits = np.asarray(cache.splits)
        chunk_split = splits[cache.chunk_recording]
        rows = {name: np.flatnonzero(splits == name) for name in ("train", "valid", "test")}
        empty = [name for name, indices in rows.items() if len(indices) == 0]
        if empty:
            raise ProbeError(f"{cache.path}: no recordings in the {' and '.join(empty)} split")
        return cls(
            features=torch.from_numpy(selected).to(device),
            chunk_labels=torch.from_numpy(cache.labels[cache.chunk_recording].astype(np.float32)).to(device),
            chunk_recording=cache.chunk_recording,
            chunks={name: torch.from_numpy(np.flatnonzero(chunk_split == name)).to(device) for name in rows},
            rows=rows,
            labels={name: cache.labels[indices] for name, indices in rows.items()},
        )

    def standardized(self) -> ProbeData:
        """A copy whose features are z-scored with the training chunks' statistics."""
        train = self.features[self.chunks["train"]].float()
        mean, std = train.mean(dim=0), train.std(dim=0, unbiased=False).clamp(min=1e-6)
        return replace(self, features=((self.features.float() - mean) / std).half())

    def recording_scores(self, model: ProbeMLP, split: str) -> np.ndarray:
        """Per-recording probabilities [recordings of split, tags]: the sigmoid of the mean of
        their chunks' logits."""
        model.eval()
        chunks = self.chunks[split]
        with torch.no_grad():
            logits = torch.cat([model(self.features[batch].float()) for batch in chunks.split(PREDICT_BATCH)])
        mean_logits = average_by_recording(
            logits.cpu().numpy(), self.chunk_recording[chunks.cpu().numpy()], self.rows[split]
        )
        return expit(mean_logits)

    def valid_roc_auc(self, model: ProbeMLP) -> float:
        return macro_roc_auc(self.labels["valid"], self.recording_scores(model, "valid"))


@dataclass
class TrainedProbe:
    """A probe at its best validation epoch, the epochs it trained, its best validation ROC-AUC
    and that of every epoch."""

    model: ProbeMLP
    lr: float
    seed: int
    epochs: int
    best_epoch: int
    valid_roc_auc: float
    history: list[float] = field(default_factory=list)


def train_probe(data: ProbeData, lr: float, seed: int, config: ProbeConfig) -> TrainedProbe:
    """Train one probe on the training chunks (module docstring); deterministic given `seed`."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    layers = data.features.shape[1] if data.features.dim() == 3 else None
    model = ProbeMLP(data.features.shape[-1], data.chunk_labels.shape[1], config, layers)
    model.to(data.features.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=config.lr_factor, patience=config.lr_patience
    )
    train = data.chunks["train"]
    best_score, best_state, best_epoch, history = -np.inf, None, 0, []
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        order = train[torch.randperm(len(train), generator=generator).to(train.device)]
        for batch in order.split(config.batch_size):
            loss = F.binary_cross_entropy_with_logits(
                model(data.features[batch].float()), data.chunk_labels[batch]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        score = data.valid_roc_auc(model)
        history.append(score)
        scheduler.step(score)
        if score > best_score:
            best_score, best_state, best_epoch = score, copy.deepcopy(model.state_dict()), epoch
        elif epoch - best_epoch >= config.early_stopping_patience:
            break
    model.load_state_dict(best_state)
    return TrainedProbe(model, lr, seed, len(history), best_epoch, best_score, history)


def _warn_dropped(tags: Sequence[str], labels: np.ndarray, split: str, task: str) -> list[str]:
    """The tags `metrics` leaves out of `split`, logged; refuses a split with no tag left."""
    dropped = [tag for tag, kept in zip(tags, evaluable_tags(labels)) if not kept]
    if len(dropped) == len(tags):
        raise ProbeError(f"{task}: no tag has both a positive and a negative recording in the {split} split")
    if dropped:
        logger.warning(
            "%s: %d tags lack a positive or a negative in the %s split and are left out of its metrics: %s",
            task,
            len(dropped),
            split,
            ", ".join(dropped),
        )
    return dropped


def _summary(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)


def fit_probe(
    cache: FeatureCache,
    layer: int | str,
    config: ProbeConfig | None = None,
    device: str | torch.device = "cpu",
    model_name: str | None = None,
    progress: bool = True,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Choose the learning rate on validation, train `config.seeds` probes and score them on test
    (module docstring). Returns the results (for results.json) and the test predictions (for
    predictions.npz: ids, tags, y_true, scores [seeds, recordings, tags], seeds)."""
    config = config or ProbeConfig()
    data = ProbeData.from_cache(cache, layer, torch.device(device))
    if config.standardize:
        data = data.standardized()
    task = cache.meta["task"]
    dropped = {
        split: _warn_dropped(cache.tags, data.labels[split], split, task) for split in ("valid", "test")
    }
    runs = len(config.learning_rates) + config.seeds - 1
    bar = tqdm(total=runs, unit="probe", desc=f"{task} layer {layer}", disable=not progress)
    search = []
    for lr in config.learning_rates:
        search.append(train_probe(data, lr, 0, config))
        bar.update(1)
    chosen = max(search, key=lambda probe: (probe.valid_roc_auc, -probe.lr))
    probes = [chosen]
    for seed in range(1, config.seeds):
        probes.append(train_probe(data, chosen.lr, seed, config))
        bar.update(1)
    bar.close()

    scores = np.stack([data.recording_scores(probe.model, "test") for probe in probes]).astype(np.float32)
    per_seed = []
    for probe, seed_scores in zip(probes, scores):
        weights = probe.model.layer_weights()
        per_seed.append(
            {
                "seed": probe.seed,
                "lr": probe.lr,
                "epochs": probe.epochs,
                "best_epoch": probe.best_epoch,
                "valid_roc_auc": probe.valid_roc_auc,
                "valid_roc_auc_per_epoch": probe.history,
                **tagging_metrics(data.labels["test"], seed_scores),
                **({"layer_weights": weights.detach().cpu().tolist()} if weights is not None else {}),
            }
        )
    summary = {key: _summary([run[key] for run in per_seed]) for key in (*METRICS, "valid_roc_auc")}
    meta = cache.meta
    results = {
        "model": model_name or meta["model"],
        "task": task,
        "layer": layer,
        "features": str(cache.path.resolve()),
        "model_path": meta["model_path"],
        "model_sha256": meta["model_sha256"],
        "normalize": meta["normalize"],
        "tags": cache.tags,
        "dropped_tags": dropped,
        "recordings": {split: len(rows) for split, rows in data.rows.items()},
        "chunks": {split: len(chunks) for split, chunks in data.chunks.items()},
        "config": asdict(config),
        "lr_search": [
            {"lr": probe.lr, "valid_roc_auc": probe.valid_roc_auc, "epochs": probe.epochs} for probe in search
        ],
        "lr": chosen.lr,
        "seeds": per_seed,
        "mean": {key: mean for key, (mean, _) in summary.items()},
        "std": {key: std for key, (_, std) in summary.items()},
    }
    predictions = {
        "ids": np.asarray([cache.ids[row] for row in data.rows["test"]]),
        "tags": np.asarray(cache.tags),
        "y_true": data.labels["test"].astype(np.uint8),
        "scores": scores,
        "seeds": np.asarray([probe.seed for probe in probes]),
    }
    return results, predictions


def write_run(out_dir: str | os.PathLike, results: dict, predictions: dict[str, np.ndarray]) -> Path:
    """Write ``predictions.npz`` and then ``results.json`` into `out_dir`, each atomically, so a
    results.json is always that of a finished run. Returns `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(out_dir / "predictions.npz", lambda handle: np.savez(handle, **predictions))
    write_json_atomically(out_dir / "results.json", results)
    return out_dir
