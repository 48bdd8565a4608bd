"""Merging culture-specialised MERT models in weight space (thesis 3.4, 4.4).

Task arithmetic and its TIES / DARE variants as registered methods (``methods``); inputs opened
lazily through the one checkpoint reader (``sources``); the streaming plan and its refusals
(``plan``); the statistics pass (``analysis``: norms, cosine similarity, TIES thresholds,
``thresholds``); the merge pass (``combine``); the outputs (``output``: checkpoints; ``similarity``:
CSV and heatmap; ``record``: ``merge.json``).
Pipeline: ``open_source`` -> ``plan_merge`` -> ``analyse`` -> ``merge`` -> ``write_merged``.
"""

from culturemert.merging.analysis import TaskVectorStats, analyse
from culturemert.merging.combine import merge
from culturemert.merging.methods import (
    METHODS,
    SWEEP_LAMBDAS,
    Consensus,
    GeneralTaskArithmetic,
    MagnitudeTrim,
    MergeError,
    RandomDrop,
    SignElection,
    Sparsification,
    check_density,
    check_lambdas,
    cosine_similarity,
    dare,
    method_named,
    register,
    task_arithmetic,
    task_vectors,
    ties,
)
from culturemert.merging.output import MERGE_FILES, write_merge_files, write_merged
from culturemert.merging.plan import MergePlan, plan_merge
from culturemert.merging.record import merge_record
from culturemert.merging.similarity import write_similarity
from culturemert.merging.sources import Source, open_source
from culturemert.merging.thresholds import MagnitudeThresholds

__all__ = [
    "METHODS",
    "MERGE_FILES",
    "SWEEP_LAMBDAS",
    "Consensus",
    "GeneralTaskArithmetic",
    "MagnitudeThresholds",
    "MagnitudeTrim",
    "MergeError",
    "MergePlan",
    "RandomDrop",
    "SignElection",
    "Sparsification",
    "Source",
    "TaskVectorStats",
    "analyse",
    "check_density",
    "check_lambdas",
    "cosine_similarity",
    "dare",
    "merge",
    "merge_record",
    "method_named",
    "open_source",
    "plan_merge",
    "register",
    "task_arithmetic",
    "task_vectors",
    "ties",
    "write_merge_files",
    "write_merged",
    "write_similarity",
]
