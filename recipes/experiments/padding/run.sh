#!/usr/bin/env bash
# Experiment "padding": desta runs the Whisper encoder on each clip's real length; the papers pad every
# clip to 30 s. Compared with the self-output, connector-only run of the targets experiment (real
# length, from the feature cache, which gives the on-the-fly loss: tested): the same 160 clips, seed
# and 3 epochs, here with the encoder on the fly on clips padded to 30 s; validation loss curves and
# the eval table after epoch 3 on the same 24 held-out clips. The speed of the three encoder modes is
# measured by bench/train.py.
#   bash recipes/experiments/padding/run.sh
set -euo pipefail
MODELS=${MODELS:-$HOME/.cache/desta-offline-models}
DATA=${DATA:-runs/experiments/data}
OUT=${OUT:-runs/experiments/padding}
real=runs/experiments/targets/self_output-connector
[ -f $real/eval-3/report.json ] || { echo "run recipes/experiments/targets/run.sh first (the real-length run)"; exit 1; }

run=$OUT/padded_30s
[ -f $run/summary.json ] || desta train recipes/experiments/config.yaml output_dir=$run \
    model.encoder=$MODELS/whisper-tiny.en model.llm=$MODELS/SmolLM2-135M-Instruct \
    data.train=$DATA/targets-self/dataset data.max_clips=160 optim.epochs=3 log.save_strategy=epoch \
    data.feature_cache=null model.pad_to_30s=true
[ -f $run/eval/report.json ] || desta eval $run --eval-set $DATA/evalset-24 --out $run/eval \
    --cache $DATA/eval-cache --max-new-tokens 48 --no-probes
desta compare real_length:3=$real/eval-3 padded_30s:3=$run/eval --runs real_length=$real --runs padded_30s=$run \
    --paired-with real_length --out recipes/experiments/padding/results --x-label epoch --title "encoder on the real length vs padded to 30 s" \
    --metrics overall:speech,duration:speech,gender:speech,speaking_speed:speech,transcription:speech,instruction_following:speech
echo "padding experiment: $((SECONDS / 60)) min"
