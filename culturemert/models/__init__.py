"""Models registered with fairseq."""

from culturemert.models.mert import MertConfig, MertModel

__all__ = ["MertConfig", "MertModel"]
