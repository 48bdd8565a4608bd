"""Segments and stage budgets: which 30 s segments each stage trains and validates on.

Thesis 3.1 and 3.5.3. Policies:

- Segments: a recording of L samples at 24 kHz gives floor(L / segment) full segments from its
  start, plus the tail when it lasts at least ``min_segment_seconds`` (5 s: one whole training crop).
- Order: each source's segments are shuffled by (seed, source name). A source contributes the
  prefix of its order whose length is closest to its target (within half a segment), so a smaller
  target's segments are a subset of a larger one's: stage 1 is a subset of stage 2.
- Mix of a stage of T hours with replay share s (stage 1 by default, ``replay_stages``): the
  cultures share (1 - s) T in proportion to their weights (their stage-2 budgets; multi stage 1:
  24.6 h each of makam, hindustani and carnatic, 6.2 h of lyra) and the replay target is
  s / (1 - s) times the culture audio selected, so the share holds when a culture has less audio
  than its target. If the replay folder has too little, the culture targets shrink to keep it.
  A source with less audio than its target uses all of it.
- Validation: each stage's ``valid.tsv`` holds, per source of the stage, ``valid_share`` of its
  target (or of all its audio, if less) in segments, at least one, taken from the end of the
  source's order; training selections never reach them, so they are training-split audio that
  no stage trains on.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from culturemert.data.config import REPLAY, STAGES, DataConfig, PreparationError
from culturemert.data.sources import Recording


@dataclass(frozen=True)
class Segment:
    """Samples [start, start + num_samples) of a recording at 24 kHz, written to `name`."""

    recording: Recording
    index: int
    start: int
    num_samples: int

    @property
    def name(self) -> str:
        return f"{self.recording.source}/{self.recording.id}_{self.index:04d}.flac"


def cut(recording: Recording, segment_samples: int, min_samples: int) -> list[Segment]:
    """The full segments of `recording` from its start, and its tail if at least `min_samples`."""
    starts = range(0, recording.num_samples, segment_samples)
    segments = [
        Segment(recording, index, start, min(segment_samples, recording.num_samples - start))
        for index, start in enumerate(starts)
    ]
    return [segment for segment in segments if segment.num_samples >= min_samples]


def segment_order(recordings: list[Recording], config: DataConfig, source: str) -> list[Segment]:
    """Every segment of `recordings`, in an order drawn from (seed, `source`) that does not depend
    on the order the recordings were found in."""
    segments = [
        segment
        for recording in sorted(recordings, key=lambda recording: recording.id)
        for segment in cut(recording, config.segment_samples, config.min_segment_samples)
    ]
    random.Random(f"{source}/{config.seed}").shuffle(segments)
    return segments


def total(segments: Iterable[Segment]) -> int:
    return sum(segment.num_samples for segment in segments)


def closest_prefix(order: list[Segment], target: int) -> list[Segment]:
    """The prefix of `order` whose total length is closest to `target` samples (the shorter on a
    tie); all of `order` when it is shorter than the target."""
    ends = np.cumsum([0] + [segment.num_samples for segment in order])
    return order[: int(np.argmin(np.abs(ends - target)))]


def select_mix(
    targets: dict[str, int], pools: dict[str, list[Segment]], share: float
) -> dict[str, list[Segment]]:
    """Training segments of one stage, per source (see the module docstring for the mix rule)."""
    cultures = {
        name: closest_prefix(pools[name], target) for name, target in targets.items() if name != REPLAY
    }
    if REPLAY not in targets:
        return cultures
    ratio = share / (1 - share)
    wanted = ratio * total(segment for chosen in cultures.values() for segment in chosen)
    available = total(pools[REPLAY])
    if available < wanted:
        scale = available / wanted
        cultures = {
            name: closest_prefix(pools[name], round(total(chosen) * scale))
            for name, chosen in cultures.items()
        }
        wanted = ratio * total(segment for chosen in cultures.values() for segment in chosen)
    return {**cultures, REPLAY: closest_prefix(pools[REPLAY], round(wanted))}


@dataclass(frozen=True)
class StagePlan:
    """One stage's requested samples, training and validation segments, per source."""

    targets: dict[str, int]
    train: dict[str, list[Segment]]
    valid: dict[str, list[Segment]]


def plan_stages(config: DataConfig, orders: dict[str, list[Segment]]) -> dict[str, StagePlan]:
    """Training and validation segments of every stage, per source, from each source's order."""
    targets = {stage: config.targets(stage) for stage in STAGES}

    def valid_count(name: str, target: int) -> int:
        return max(1, round(config.valid_share * min(target, total(orders[name])) / config.segment_samples))

    held_out = {
        name: max(valid_count(name, targets[stage][name]) for stage in STAGES if name in targets[stage])
        for name in orders
    }
    too_short = [
        f"{name} ({len(order)} segments)" for name, order in orders.items() if len(order) <= held_out[name]
    ]
    if too_short:
        raise PreparationError(
            f"too little audio to hold out validation segments and still train: {', '.join(too_short)}"
        )
    pools = {name: order[: len(order) - held_out[name]] for name, order in orders.items()}
    plans = {}
    for stage in STAGES:
        train = select_mix(targets[stage], pools, config.stage_replay_share(stage))
        if not any(train.values()):
            raise PreparationError(
                f"{stage}: {config.stage_hours[stage]} h selects no {config.segment_seconds} s segment; "
                f"raise --{stage}-hours"
            )
        valid = {
            name: orders[name][::-1][: valid_count(name, target)] for name, target in targets[stage].items()
        }
        plans[stage] = StagePlan(targets[stage], train, valid)
    return plans
