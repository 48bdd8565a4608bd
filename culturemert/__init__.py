"""CultureMERT: continual pre-training of MERT across musical cultures, as a fairseq user dir.

Importing the package registers the model ``mert`` with fairseq; pass this folder as
``common.user_dir`` to ``fairseq-hydra-train``.
"""

from culturemert import compat  # noqa: F401  (must run before fairseq loads checkpoints)
from culturemert.audio import load_audio
from culturemert.checkpoint import load_model
from culturemert.models import MertConfig, MertModel

__all__ = ["MertConfig", "MertModel", "load_audio", "load_model"]
