"""Two-stage continual pre-training of MERT for one run, then an HF export (thesis 3.3).

    bash scripts/run_cpt.sh <run> [hydra overrides...]

<run> is a run of configs/cpt/ (multi, makam, hindustani, carnatic, lyra, demo). Stage 1 trains
the CNN feature extractor and the codeword embeddings on the replay mix (from an HF folder also
the fresh heads); stage 2 trains everything on the full data; each stage starts a fresh
optimizer and LR schedule. The final model is exported to <CPT_OUT>/<NAME>/hf.

Environment (defaults in brackets):
  INIT       start checkpoint: a fairseq .pt (e.g. the published MERT-v1-95M_fairseq.pt) or an
             HF folder [weights/MERT-v1-95M_fairseq.pt]; the architecture always comes from it
  NAME       name of this run's outputs, for several runs of one config [<run>]
  MANIFESTS  folder with stage1/ and stage2/ manifests [data_manifests/<NAME>]
  TOKENS     token caches, <TOKENS>/stage<n>/<split>/ [<MANIFESTS>/tokens]; built on first use
             when ENCODEC names the EnCodec 24 kHz weights
  ENCODEC    EnCodec weights for building missing caches [weights/encodec_24khz-d7cc33bc.th]
  CPT_OUT    output root; this run writes <CPT_OUT>/<NAME>/{stage1,stage2,hf} [runs]
  PRESET     configs/preset/<PRESET>.yaml, applied before the run's config so the run's own
             values win; 'tiny' (CPU-sized batches and crops) without INIT starts from a small
             random model (configs/model/tiny.yaml)
  ABLATION   configs/ablation/<ABLATION>.yaml, added to every stage; its 'stages' list says
             which stages run (single_stage_*: [2])
  LAUNCH     a launcher for multi-process training, e.g. "torchrun --nproc_per_node 8", used
             with the override +launch=torchrun (README, "Scaling out")
  RESTART    1: move an existing <CPT_OUT>/<NAME> aside (to <NAME>.replaced-<time>) and start afresh

The run folder records a fingerprint of its inputs (INIT, manifests, token caches, each stage's
composed config, the code version). Rerunning with the same inputs resumes the unfinished stage
from its checkpoint_last.pt and skips finished ones; other inputs are refused, naming what
differs. A second run in a folder that is in use is refused.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from culturemert.cli import command
from culturemert.training.launcher import Settings, launch

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="run_cpt.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", help="a run of configs/cpt/ (<run>_stage1.yaml, <run>_stage2.yaml)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides for every stage")
    args = parser.parse_args(argv)
    settings = Settings.from_environment(REPO, args.run, args.overrides, dict(os.environ))
    last = launch(settings)
    logging.getLogger("run_cpt").info("done")
    for stage in sorted(settings.out.glob("stage*/")):
        print(f"  {stage.name} checkpoints: {stage} (log: {stage / 'hydra' / 'hydra_train.log'})")
    print(f"  final model (fairseq):   {last}")
    print(f"  final model (HF folder): {settings.out / 'hf'}")
    return 0


entry = command(main, "run_cpt.sh")

if __name__ == "__main__":
    entry()
