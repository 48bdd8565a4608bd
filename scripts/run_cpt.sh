#!/usr/bin/env bash
# Two-stage continual pre-training of MERT for one culture (thesis 3.3, SPEC §3).
#
#   bash scripts/run_cpt.sh <culture> [hydra overrides...]
#
# <culture> is a run of configs/cpt/: multi, makam, hindustani, carnatic or lyra (or demo). Stage 1
# trains the conv feature extractor and codeword embeddings on the replay mix; stage 2 trains
# everything on the full data; each stage starts a fresh optimizer and LR schedule. The final
# model is exported to a Hugging Face folder.
#
# Environment (defaults in brackets):
#   INIT       start checkpoint, fairseq .pt or HF folder [weights/MERT-v1-95M_fairseq.pt];
#              the model's architecture always comes from it
#   NAME       name of this run's outputs, for several runs of one config [<culture>]
#   MANIFESTS  folder with stage1/ and stage2/ manifests [data_manifests/<NAME>]
#   TOKENS     token caches, <TOKENS>/stage<n>/<split>/ [<MANIFESTS>/tokens]; built on first use
#              when ENCODEC names the EnCodec 24 kHz weights
#   ENCODEC    EnCodec weights for building missing caches [weights/encodec_24khz-d7cc33bc.th]
#   CPT_OUT    output root; this run writes <CPT_OUT>/<NAME>/{stage1,stage2,hf} [runs]
#   PRESET     'tiny': configs/preset/tiny.yaml (CPU-sized steps, batch and crops); without
#              INIT it starts from a small random model (configs/model/tiny.yaml)
#   ABLATION   a file of configs/ablation/ added to both stages; single_stage_* runs stage 2 only
#   LAUNCH     a launcher for multi-process training, e.g. "torchrun --nproc_per_node 8", used
#              with the override +launch=torchrun (README, "Scaling out")
#
# Rerunning after an interruption resumes the unfinished stage from its checkpoint_last.pt and
# skips finished stages.
set -euo pipefail

fail() { echo "run_cpt.sh: $*" >&2; exit 2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ $# -ge 1 ]] || fail "usage: bash scripts/run_cpt.sh <culture> [hydra overrides...]"
culture=$1
shift
[[ -f "$repo/configs/cpt/${culture}_stage1.yaml" ]] ||
    fail "no run '$culture' in configs/cpt/; one of: $(ls "$repo/configs/cpt" | sed -n 's/_stage1.yaml$//p' | xargs)"

name=${NAME:-$culture}
out=${CPT_OUT:-runs}/$name
manifests=${MANIFESTS:-data_manifests/$name}
tokens=${TOKENS:-$manifests/tokens}
encodec=${ENCODEC:-weights/encodec_24khz-d7cc33bc.th}
preset=${PRESET:-}
ablation=${ABLATION:-}
mkdir -p "$out"

extra=()
if [[ -n "$preset" ]]; then
    [[ -f "$repo/configs/preset/$preset.yaml" ]] || fail "no preset configs/preset/$preset.yaml"
    extra+=("+preset=$preset")
fi
stages=(1 2)
if [[ -n "$ablation" ]]; then
    [[ -f "$repo/configs/ablation/$ablation.yaml" ]] ||
        fail "no ablation configs/ablation/$ablation.yaml; one of: $(ls "$repo/configs/ablation" | sed 's/.yaml$//' | xargs)"
    extra+=("+ablation=$ablation")
    [[ "$ablation" == single_stage_* ]] && stages=(2)
fi
if ! python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    echo "run_cpt.sh: no CUDA device, training on the CPU in FP32 (common.fp16=false)"
    extra+=("common.fp16=false")
fi
if [[ -z "${WANDB_API_KEY:-}" ]]; then
    export WANDB_MODE=${WANDB_MODE:-offline}  # common.wandb_project logs locally without a key
fi

# The start checkpoint, as a fairseq .pt (fairseq's finetune_from_model needs one).
init=${INIT:-}
if [[ -z "$init" && "$preset" == tiny ]]; then
    init=$out/init_tiny.pt
    [[ -f "$init" ]] || python "$repo/scripts/init_model.py" --config "$repo/configs/model/tiny.yaml" --out "$init"
fi
init=${init:-weights/MERT-v1-95M_fairseq.pt}
if [[ -d "$init" ]]; then
    [[ -f "$out/init.pt" ]] || python "$repo/scripts/convert_checkpoint.py" "$init" "$out/init.pt"
    init=$out/init.pt
fi
[[ -f "$init" ]] || fail "start checkpoint $init not found: get MERT-v1-95M_fairseq.pt (README, 'Weights') or set INIT"
mapfile -t architecture < <(python "$repo/scripts/model_overrides.py" "$init")
[[ ${#architecture[@]} -gt 0 ]] || fail "could not read the architecture of $init"

for stage in "${stages[@]}"; do
    for split in train valid; do
        manifest=$manifests/stage$stage/$split.tsv
        [[ -f "$manifest" ]] || fail "missing manifest $manifest: run scripts/prepare_data.py (README) or set MANIFESTS"
        cache=$tokens/stage$stage/$split
        if [[ ! -f "$cache/meta.json" ]]; then
            [[ -f "$encodec" ]] ||
                fail "no token cache $cache and no EnCodec weights at $encodec to build it: get them (README, 'Weights') and set ENCODEC, or set TOKENS"
            python "$repo/scripts/extract_tokens.py" --manifest "$manifest" --encodec "$encodec" --out "$cache"
        fi
    done
done

if ! problems=$(python "$repo/scripts/check_stage_data.py" --manifests "$manifests" --tokens "$tokens" \
    --stages "${stages[@]}" 2>&1 >/dev/null); then
    fail "the run's manifests and token caches do not fit together (rebuild a stale cache: delete it and set ENCODEC):
$(grep '^check_stage_data: ' <<<"$problems" | sed 's/^check_stage_data: /  /')"
fi

start=$init
for stage in "${stages[@]}"; do
    save_dir=$out/stage$stage
    if [[ -f "$save_dir/finished" ]]; then
        echo "run_cpt.sh: stage $stage already finished ($save_dir), skipping"
    else
        echo "run_cpt.sh: stage $stage from $start -> $save_dir"
        ${LAUNCH:-} "$(command -v fairseq-hydra-train)" --config-dir "$repo/configs" --config-name "stage$stage" \
            "+cpt=${culture}_stage$stage" "${extra[@]}" \
            "common.user_dir=$repo/culturemert" \
            "task.data=$manifests/stage$stage" "task.tokens=$tokens/stage$stage" \
            "checkpoint.save_dir=$save_dir" "checkpoint.finetune_from_model=$start" \
            "hydra.run.dir=$save_dir/hydra" "hydra.job.chdir=false" \
            "${architecture[@]}" "$@"
        touch "$save_dir/finished"
    fi
    start=$save_dir/checkpoint_last.pt
done

python "$repo/scripts/convert_checkpoint.py" "$start" "$out/hf"
echo "run_cpt.sh: done"
for stage in "${stages[@]}"; do
    echo "  stage $stage checkpoints: $out/stage$stage (log: $out/stage$stage/hydra/hydra_train.log)"
done
echo "  final model (fairseq):    $start"
echo "  final model (HF folder):  $out/hf"
