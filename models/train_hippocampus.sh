#!/usr/bin/env bash
# Trains the shipped hippocampus bundles (and the study's comparison models) with the acecal engine.
# Same architecture, seed, split and schedule for every loss; only --loss (and --loss-param) differ.
# Schedule: 60 epochs of warm-up cosine, then the run is extended to 120 epochs (a second cosine cycle that starts
# from the first one's last checkpoint, a warm restart); STAGES="60 120" by default, the last stage publishes.
# Resumable: rerun the same command to continue from the last checkpoint in $WORK/<id> (--resume starts fresh when
# there is none). OUT= picks the models folder, WORK= the checkpoint folder.
# Usage: models/train_hippocampus.sh LOSS ID [extra acecal train flags, e.g. --time-limit 50, --overwrite]
#   LOSS: baseline_dice_ce | hardl1ace_dice_ce | softl1ace_dice_ce | labelsmooth_dice_ce | nacl_dice | dicepp_ce
#         | twohead_dice_ce_softace | twohead_dice_ce_hardace (these two with --network SegResNetTwoHead)
set -euo pipefail
cd "$(dirname "$0")/.."
loss=$1; id=$2; shift 2
data=${ACECAL_HIPPOCAMPUS:-../shared/data/msd_hippocampus/dataset.json}
out=${OUT:-models}
work=${WORK:-runs}   # checkpoints; put them outside the checkout (e.g. ~/.acecal/runs) to keep them across clones
read -r -a stages <<< "${STAGES:-60 120}"
if [[ -e "$out/$id" && " $* " != *" --overwrite "* ]]; then
  echo "$out/$id exists: pass --overwrite to replace it, or pick another ID or OUT=" >&2; exit 2
fi
for epochs in "${stages[@]}"; do
  publish=(--no-publish); [[ $epochs == "${stages[-1]}" ]] && publish=()
  .venv/bin/acecal train "$data" \
    --loss "$loss" --id "$id" --out "$out" --work-dir "$work/$id" --resume \
    --roi 32,48,32 --batch-size 4 --num-samples 1 \
    --init-filters 8 --blocks-down 1,2,2,4 --blocks-up 1,1,1 \
    --epochs "$epochs" --val-every 5 --val-fraction 0.2 --seed 12345 \
    --lr 1e-3 --warmup-epochs 3 --threads 1 --cpu-bf16 --fit-temperature \
    --modality MRI --data-licence "CC BY-SA 4.0" \
    --data-source "Medical Segmentation Decathlon Task04 Hippocampus, 208 labelled MRI crops (Vanderbilt University Medical Center; Simpson et al. 2019, arXiv:1902.09063; Antonelli et al. 2022, Nat Commun 13:4128)" \
    --description "SegResNet (init_filters 8) for the anterior and posterior hippocampus on T1 MRI crops, trained with $loss" \
    "${publish[@]}" "$@"
done
