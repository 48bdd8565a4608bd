"""Tasks registered with fairseq."""

from culturemert.tasks.mert_cpt import MertCptConfig, MertCptTask

__all__ = ["MertCptConfig", "MertCptTask"]
