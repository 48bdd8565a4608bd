"""Criteria registered with fairseq."""

from culturemert.criterions.mert_mlm import MertMlmConfig, MertMlmCriterion

__all__ = ["MertMlmConfig", "MertMlmCriterion"]
