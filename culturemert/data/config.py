"""The data config of a run (``configs/data/<run>.yaml``): stage budgets and replay share.

Thesis 3.1 and 3.5.3: stage 2 holds each culture's hour budget (200 h makam, hindustani and
carnatic, 50 h lyra; 650 h for the multi-culture run); stage 1 a subset (60 h, 20 h for lyra,
100 h multi-culture) of which 20 % is Western replay (Music4All). Every number is a field of the
run's data config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from culturemert.audio import SAMPLE_RATE
from culturemert.errors import UserError

STAGES = ("stage1", "stage2")
REPLAY = "replay"  # the source name of the Western replay folder


class PreparationError(UserError):
    """Inputs that cannot make a run's data; the message names the problem and the fix."""


@dataclass(frozen=True)
class DataConfig:
    """The data of one run (configs/data/<run>.yaml).

    ``cultures`` maps each culture to its stage-2 hours, which also weigh the cultures' share of
    stage 1; ``stage_hours`` gives each stage's training hours (updates = hours * 3600 / 160 s);
    ``replay_share`` of the hours of each stage in ``replay_stages`` come from the replay folder.
    """

    cultures: dict[str, float]
    stage_hours: dict[str, float]
    replay_share: float
    replay_stages: tuple[str, ...]
    segment_seconds: float
    min_segment_seconds: float
    valid_share: float
    seed: int

    def __post_init__(self):
        problems = []
        if not self.cultures or min(self.cultures.values()) <= 0 or REPLAY in self.cultures:
            problems.append(f"cultures must map names other than {REPLAY!r} to positive hours")
        if set(self.stage_hours) != set(STAGES) or min(self.stage_hours.values()) <= 0:
            problems.append(f"stage_hours must give positive hours for exactly {list(STAGES)}")
        if not 0 <= self.replay_share < 1:
            problems.append("replay_share must lie in [0, 1)")
        if not set(self.replay_stages) <= set(STAGES):
            problems.append(f"replay_stages must be a subset of {list(STAGES)}")
        if not 0 < self.min_segment_seconds <= self.segment_seconds:
            problems.append("need 0 < min_segment_seconds <= segment_seconds")
        if not 0 < self.valid_share < 1:
            problems.append("valid_share must lie in (0, 1)")
        if problems:
            raise PreparationError(f"invalid data config: {'; '.join(problems)}")

    @property
    def segment_samples(self) -> int:
        return round(self.segment_seconds * SAMPLE_RATE)

    @property
    def min_segment_samples(self) -> int:
        return round(self.min_segment_seconds * SAMPLE_RATE)

    def stage_replay_share(self, stage: str) -> float:
        return self.replay_share if stage in self.replay_stages else 0.0

    def targets(self, stage: str) -> dict[str, int]:
        """Requested samples per source of `stage`: the replay share, if any, and the rest split
        between the cultures in proportion to their weights."""
        samples = self.stage_hours[stage] * 3600 * SAMPLE_RATE
        share = self.stage_replay_share(stage)
        weight = sum(self.cultures.values())
        targets = {
            name: round((1 - share) * samples * hours / weight) for name, hours in self.cultures.items()
        }
        if share > 0:
            targets[REPLAY] = round(share * samples)
        return targets


def load_data_config(path: str | os.PathLike) -> DataConfig:
    """Read a data config YAML; unknown or missing keys are refused by name."""
    path = Path(path)
    if not path.is_file():
        raise PreparationError(f"{path}: no such data config; see configs/data/ for the runs")
    values = yaml.safe_load(path.read_text())
    if not isinstance(values, dict):
        raise PreparationError(f"{path}: expected a mapping of data config keys")
    names = {field.name for field in fields(DataConfig)}
    if set(values) != names:
        raise PreparationError(
            f"{path}: unknown keys {sorted(set(values) - names)}, missing keys {sorted(names - set(values))}"
        )
    values["replay_stages"] = tuple(values["replay_stages"])
    return DataConfig(**values)
