"""CultureMERT: continual pre-training of MERT across musical cultures, as a fairseq user dir.

Importing the package registers with fairseq the model ``mert``, the criterion ``mert_mlm``,
the task ``mert_cpt`` and the LR schedule ``cpt_cosine``; pass this folder as
``common.user_dir`` to ``fairseq-hydra-train``.
"""

from culturemert import compat

compat.apply()

from culturemert import criterions, lr_scheduler, tasks  # noqa: E402, F401  (registrations)
from culturemert.audio import load_audio  # noqa: E402
from culturemert.checkpoint import load_model  # noqa: E402
from culturemert.models import MertConfig, MertModel  # noqa: E402

__all__ = ["MertConfig", "MertModel", "load_audio", "load_model"]
