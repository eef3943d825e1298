#!/usr/bin/env bash
# Experiment "padding": desta runs the Whisper encoder on each clip's real length; the papers pad every
# clip to 30 s. Same 240 clips, seed and 150 steps, encoder on the fly (no feature cache), both ways:
# validation loss curves, samples/s, and the eval table on the 48 held-out clips.
#   bash recipes/experiments/padding/run.sh
set -euo pipefail
MODELS=${MODELS:-$HOME/.cache/desta-offline-models}
DATA=${DATA:-runs/experiments/data}
OUT=${OUT:-runs/experiments/padding}
bash recipes/experiments/data.sh

for mode in real_length padded_30s; do
  run=$OUT/$mode
  pad=false; [ $mode = padded_30s ] && pad=true
  [ -f $run/summary.json ] || desta train recipes/experiments/config.yaml output_dir=$run \
      model.encoder=$MODELS/whisper-tiny.en model.llm=$MODELS/SmolLM2-135M-Instruct \
      data.train=$DATA/targets-self/dataset data.max_clips=240 data.feature_cache=null model.pad_to_30s=$pad \
      optim.max_steps=150 log.eval_steps=25 log.save_steps=150
  [ -f $run/eval/report.json ] || desta eval $run --eval-set $DATA/evalset --out $run/eval \
      --cache $DATA/eval-cache --max-new-tokens 48 --no-probes
done
desta compare real_length:150=$OUT/real_length/eval padded_30s:150=$OUT/padded_30s/eval \
    --runs real_length=$OUT/real_length --runs padded_30s=$OUT/padded_30s \
    --out recipes/experiments/padding/results --x-label step --title "encoder on the real length vs padded to 30 s" \
    --metrics overall:speech,duration:speech,gender:speech,speaking_speed:speech,transcription:speech,instruction_following:speech
echo "padding experiment: $((SECONDS / 60)) min"
