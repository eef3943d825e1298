#!/usr/bin/env bash
# Experiment "scale": the smol set-up on all 1200 clips for 400 steps of 4 with the feature cache,
# evaluated every 100 steps on 24 held-out clips (the targets experiment's set: its text references are
# cached; EVAL_SET=evalset for all 48, which narrows the intervals and doubles the eval time): per-category
# score against steps, with 95 % intervals. The README's headline figures come from this run.
#   bash recipes/experiments/scale/run.sh
set -euo pipefail
MODELS=${MODELS:-$HOME/.cache/desta-offline-models}
DATA=${DATA:-runs/experiments/data}
OUT=${OUT:-runs/experiments/scale}
EVAL_SET=${EVAL_SET:-evalset-24}
bash recipes/experiments/data.sh

[ -f $OUT/summary.json ] || desta train recipes/experiments/config.yaml output_dir=$OUT \
    model.encoder=$MODELS/whisper-tiny.en model.llm=$MODELS/SmolLM2-135M-Instruct \
    data.train=$DATA/targets-self/dataset optim.batch_size=4 optim.max_steps=400 log.save_steps=100
reports=()
for step in 100 200 300 400; do
  [ -f $OUT/eval-$step/report.json ] || desta eval $OUT/checkpoint-$step --eval-set $DATA/$EVAL_SET \
      --out $OUT/eval-$step --cache $DATA/eval-cache --max-new-tokens 48 --probe-max-new-tokens 48
  reports+=("scale:$step=$OUT/eval-$step")
done
mkdir -p recipes/experiments/scale/results
cp $OUT/eval-400/report.md recipes/experiments/scale/results/report-400.md
desta compare "${reports[@]}" --runs scale=$OUT --out recipes/experiments/scale/results --x-label step \
    --title "smol on 1200 clips: score against training steps" \
    --metrics overall:speech,gender:speech,accent:speech,speaking_speed:speech,pitch:speech,volume:speech,duration:speech,transcription:speech,instruction_following:speech,overall:agreement:speech
echo "scale experiment: $((SECONDS / 60)) min"
